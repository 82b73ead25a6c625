"""flowmap: flow map learning from Python.

A flow map is a network `f(x_t, t, s) ≈ Φ_{t→s}(x_t)`, the solution operator of the probability-flow ODE
`dx/dτ = v(x, τ)`: time runs from data (t = 0) to noise (t = 1), a map goes down (0 ≤ s ≤ t ≤ 1), the path
is `x_t = (1 − t)·x0 + t·x1` with `x1 ~ N(0, I)`, and `Φ_{t→s}(x) = x + ∫_t^s v(x_τ, τ) dτ`. A flow-matching
teacher learns `v`; a flow map distilled from it (or trained from data) samples in one to four evaluations.

    >>> import numpy as np, flowmap
    >>> teacher = flowmap.train_teacher("checkerboard", steps=2000, progress=False)
    >>> fmap = flowmap.distill(teacher, method="emd", steps=1000, progress=False)
    >>> x = fmap.sample(10_000, nfe=1)          # one network evaluation per sample
    >>> rows = flowmap.evaluate(fmap, nfe=[1, 2, 4])

Arrays go in and out as NumPy arrays: points `N × D`, images `N × H × W` or `N × C × H × W` (uint8 or
float, in their own range; samples come back in the same range). Long calls release the GIL; Ctrl-C stops
training after the current step and raises `flowmap.errors.TrainingInterrupted` carrying the state to
resume from. `flowmap.torch` holds PyTorch twins of every network.
"""

import json as _json
import os as _os

from . import _flowmap
from .errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    DataError,
    DivergedError,
    FileNotFound,
    FlowmapError,
    FlowmapIOError,
    InvalidArgument,
    TensorError,
    TrainingInterrupted,
)

__version__ = _flowmap.version()

TrainState = _flowmap.TrainState

__all__ = [
    "Data",
    "Model",
    "TrainState",
    "Evaluation",
    "data",
    "load",
    "train_teacher",
    "distill",
    "train",
    "evaluate",
    "methods",
    "set_threads",
    "FlowmapError",
    "TrainingInterrupted",
]


# ---------------------------------------------------------------------------------------------------- data


class Data:
    """A data source: a spec string or a NumPy array (with labels), as `flowmap.data` makes it.

    >>> d = flowmap.data(np.random.default_rng(0).normal(size=(1000, 2)))
    >>> d.state_shape
    [2]
    """

    def __init__(self, native):
        self._native = native

    @property
    def name(self):
        """The name checkpoints record (the spec, or `array:N×…` for an array)."""
        return self._native.name

    @property
    def state_shape(self):
        """The shape of one state: `[D]` for points, `[C, H, W]` for images."""
        return list(self._native.state_shape)

    @property
    def num_classes(self):
        """The number of classes of labelled data (else None)."""
        return self._native.num_classes

    def heldout(self, n, seed=0):
        """`n` held-out states (10% of the rows are held out, seeded), images in [−1, 1]."""
        return self._native.heldout(n, seed)

    def __repr__(self):
        return f"flowmap.Data({self.name!r}, state_shape={self.state_shape}, num_classes={self.num_classes})"


def data(source, labels=None, name=None):
    """A data source from a spec or an array.

    `source` is a spec string (`"checkerboard"`, `"moons"`, `"mnist"`, `"gmm:mix.json"`, `"points.npy"`,
    an image folder; `flowmap data --help` lists them) or an array: `N × D` points, used as they are, or
    `N × H × W` / `N × C × H × W` images (uint8 pixels 0–255, or floats in their own range), mapped to
    [−1, 1]. `labels` (N integers) make image data class-conditional.

    >>> d = flowmap.data(images_uint8, labels=digits)   # N × 28 × 28, N labels
    """
    return _to_data(source, labels, name)


def _to_data(source, labels=None, name=None):
    if isinstance(source, Data):
        if labels is not None:
            raise InvalidArgument("labels go with an array, not with a Data")
        return source
    if isinstance(source, (str, _os.PathLike)):
        if labels is not None:
            raise InvalidArgument("labels go with an array; a spec names its own labels")
        return Data(_flowmap.Data.spec(_os.fspath(source)))
    import numpy as np

    arr = np.asarray(source)
    if arr.ndim not in (2, 3, 4):
        raise InvalidArgument(
            f"an array of shape {arr.shape}: expected N × D points, N × H × W or N × C × H × W images"
        )
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.number)):
        raise InvalidArgument(f"an array of dtype {arr.dtype}: expected numbers")
    uint8 = arr.dtype == np.uint8
    values = np.ascontiguousarray(arr, dtype=np.float64)
    lab = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.shape[0] != arr.shape[0]:
            raise InvalidArgument(f"labels of shape {lab.shape} for {arr.shape[0]} states: expected ({arr.shape[0]},)")
        if not np.issubdtype(lab.dtype, np.integer):
            raise InvalidArgument(f"labels of dtype {lab.dtype}: expected integers")
        lab = np.ascontiguousarray(lab, dtype=np.int64)
    if name is None:
        name = "array:" + "×".join(str(d) for d in arr.shape)
    return Data(_flowmap.Data.array(name, values, uint8, lab))


# --------------------------------------------------------------------------------------------------- models


def _classes(classes):
    """(spec, list) for the native layer: None, "all", "null", a class number, or one class per sample."""
    if classes is None:
        return None, None
    if isinstance(classes, str):
        return classes, None
    if isinstance(classes, (int,)) or (hasattr(classes, "ndim") and getattr(classes, "ndim") == 0):
        k = int(classes)
        if k < 0:
            raise InvalidArgument(f"class {k} is out of range: classes are non-negative")
        return str(k), None
    import numpy as np

    arr = np.asarray(classes).reshape(-1)
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise InvalidArgument("classes must be non-negative integers")
    return None, [int(v) for v in arr]


def _times(v, what):
    import numpy as np

    arr = np.ascontiguousarray(np.asarray(v, dtype=np.float32).reshape(-1))
    if arr.size == 0:
        raise InvalidArgument(f"{what} is empty")
    return arr


class Model:
    """A flowmap model: a flow map, a consistency model, a teacher network, or the analytic Gaussian-mixture
    teacher (`flowmap.load("gmm:mix.json")`).

    A flow map is `f(x, t, s) = x + (s − t)·F(x, t, s)`, trained so that `f ≈ Φ_{t→s}`; a teacher is the
    velocity `v(x, t)` of the probability-flow ODE, sampled with an ODE solver.
    """

    def __init__(self, native):
        self._native = native

    @property
    def kind(self):
        """`"flow_map"`, `"consistency_model"` (a map to s = 0 only), `"teacher"` or `"analytic"`."""
        return self._native.kind

    @property
    def state_shape(self):
        """The shape of one state."""
        return list(self._native.state_shape)

    @property
    def num_classes(self):
        """The classes of a class-conditional model (its null class is this index), else None."""
        return self._native.num_classes

    @property
    def guidance_range(self):
        """The guidance scales `[lo, hi]` a guidance-distilled map takes, else None."""
        r = self._native.guidance_range
        return None if r is None else list(r)

    @property
    def metadata(self):
        """The checkpoint metadata as a dict: kind, architecture (`arch`), path, data, and `training` (the
        objective, its settings and the optimiser's). None for the analytic teacher."""
        raw = self._native.metadata_json
        return None if raw is None else _json.loads(raw)

    @property
    def config(self):
        """The architecture as a dict (the `[arch]` table that rebuilds it)."""
        meta = self.metadata
        return None if meta is None else meta["arch"]

    def save(self, path):
        """Writes the model as a flowmap checkpoint (safetensors with its metadata), atomically.

        >>> fmap.save("map.safetensors"); flowmap.load("map.safetensors")
        """
        self._native.save(_os.fspath(path))

    def sample(
        self,
        n,
        nfe=1,
        classes=None,
        guidance=None,
        guide=None,
        grid=None,
        grid_power=1.0,
        solver="euler",
        sampler=None,
        seed=0,
        precision="f32",
    ):
        """`n` samples, an `n × state shape` float32 array in the data's own range (uint8-range images come
        back in 0–255).

        A flow map walks the grid `1 = t_0 > … > t_k = 0` with `x ← f(x, t_i, t_{i+1})` (`nfe` uniform
        steps, `t_i = (1 − i/k)^grid_power`, or `grid=[1, 0.6, 0]`); a consistency model re-noises between
        jumps (`sampler="consistency"`, its default; `"gamma:G"` is CTM's γ-sampling). A teacher integrates
        the ODE from noise with `solver` (`euler`, `heun`, `midpoint`, `rk4` within `nfe` evaluations, or
        adaptive `dopri5`).

        `classes`: a class number, `"all"` (sample i gets class i mod C, the default), `"null"` (the
        unconditional model) or one class per sample. `guidance`: the scale `w` of classifier-free guidance
        `v(x, t, ∅) + w·(v(x, t, c) − v(x, t, ∅))` for a teacher (with `guide=`, autoguidance by that weaker
        model), or the input of a guidance-distilled map. The same `seed` gives the same bits.
        `precision="bf16"`: the networks' matrix products with bf16 operands and f32 sums (on a CPU with
        AVX-512 BF16; elsewhere f32).

        >>> x = fmap.sample(64, nfe=2, classes=7)
        """
        spec, lst = _classes(classes)
        return self._native.sample(
            int(n),
            int(nfe),
            spec,
            lst,
            None if guidance is None else float(guidance),
            None if guide is None else guide._native,
            None if grid is None else [float(t) for t in grid],
            float(grid_power),
            solver,
            sampler,
            int(seed),
            str(precision),
        )

    def __call__(self, x, t, s, classes=None, guidance=None, solver="dopri5", steps=100, tol=1e-5):
        """The map `f(x, t, s) ≈ Φ_{t→s}(x)` on a batch `x` (`N × state shape`, in the data's range) from time
        `t` down to `s` (numbers, or one per row). A teacher applies its exact Φ by `solver` (`dopri5` to
        `tol`, or a fixed scheme with `steps` steps).

        >>> x0 = fmap(np.random.randn(5, 2).astype(np.float32), t=1.0, s=0.0)
        """
        import numpy as np

        spec, lst = _classes(classes)
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        return self._native.map(
            x,
            _times(t, "t"),
            _times(s, "s"),
            spec,
            lst,
            None if guidance is None else float(guidance),
            solver,
            int(steps),
            float(tol),
        )

    def velocity(self, x, t, classes=None, guidance=None):
        """A teacher's velocity `v(x, t)` of `dx/dt = v(x, t)` (in the model's [−1, 1] units per unit time)
        at states `x` (in the data's range) and times `t`.

        >>> v = teacher.velocity(x, t=0.5)
        """
        import numpy as np

        spec, lst = _classes(classes)
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        return self._native.velocity(x, _times(t, "t"), spec, lst, None if guidance is None else float(guidance))

    def __repr__(self):
        return f"flowmap.Model(kind={self.kind!r}, state_shape={self.state_shape}, num_classes={self.num_classes})"


def load(path, device="cpu"):
    """A model from a flowmap checkpoint (teacher, flow map or consistency model), or the analytic
    Gaussian-mixture teacher `"gmm:SPEC.json"`. `device`: `"cpu"` or `"cuda:0"` (a CUDA build).

    >>> fmap = flowmap.load("map.safetensors")
    """
    return Model(_flowmap.Model.load(_os.fspath(path), device))


# ------------------------------------------------------------------------------------------------- training


def _progress(progress, total, label):
    """The callback the native loop calls as `(step, loss)` (and `(None, None)` when done)."""
    if progress is None or progress is False:
        return None
    if callable(progress):
        return progress
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc=label, unit="step", leave=False)

    def report(step, loss):
        if step is None:
            bar.close()
            return
        bar.update(step - bar.n)
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    return report


def _run_config(config, train_settings, distill_settings, arch_settings):
    """The `{"train", "distill", "arch"}` configuration: a TOML file or dict, then the keyword arguments."""
    cfg = {}
    if config is not None:
        if isinstance(config, dict):
            cfg = {k: dict(v) for k, v in config.items()}
        else:
            try:
                import tomllib
            except ImportError:  # Python < 3.11
                import tomli as tomllib
            with open(_os.fspath(config), "rb") as f:
                cfg = tomllib.load(f)
    unknown = set(cfg) - {"train", "distill", "arch"}
    if unknown:
        raise ConfigError(f"unknown configuration tables {sorted(unknown)} (expected train, distill, arch)")
    for table, extra in (("train", train_settings), ("distill", distill_settings), ("arch", arch_settings)):
        extra = {k: v for k, v in (extra or {}).items() if v is not None}
        if extra:
            cfg[table] = {**cfg.get(table, {}), **extra}
    return cfg


def _train_settings(steps, batch, lr, ema, seed, minutes, label_dropout, guidance_range=None, precision=None):
    if minutes is not None and minutes <= 0:
        raise InvalidArgument(f"minutes must be positive, got {minutes}")
    gr = None
    if guidance_range is not None:
        gr = [float(guidance_range)] * 2 if isinstance(guidance_range, (int, float)) else [float(v) for v in guidance_range]
    if minutes is not None and steps is not None:
        raise InvalidArgument("give steps or minutes, not both")
    return dict(
        steps=steps,
        batch_size=batch,
        lr=lr,
        ema_decay=ema,
        seed=seed,
        label_dropout=label_dropout,
        guidance_range=gr,
        precision=None if precision is None else str(precision),
    )


def _resume(resume):
    if resume is None or isinstance(resume, TrainState):
        return resume
    return TrainState.load(_os.fspath(resume))


def _threads(threads):
    if threads is not None:
        set_threads(threads)


def train_teacher(
    data,
    labels=None,
    *,
    arch=None,
    steps=None,
    batch=None,
    lr=None,
    ema=None,
    seed=0,
    minutes=None,
    label_dropout=None,
    precision=None,
    config=None,
    device="cpu",
    threads=None,
    progress=True,
    state=None,
    checkpoint_every=None,
    resume=None,
    **arch_settings,
):
    """Trains a teacher by conditional flow matching: `min E‖v(x_t, t) − (x1 − x0)‖²` over `t ~ U[0, 1]`,
    data `x0` and noise `x1`, on the linear path (Lipman et al. 2023). Returns the EMA network as a `Model`.

    `data`: a spec, an array (with `labels`) or a `Data`. `arch`: `"mlp"` or `"unet"` (default: an MLP for
    points, a U-Net for images), its settings as keywords (`hidden=512`, `channels=64`, …). `steps`,
    `batch`, `lr` (AdamW peak, warm-up then cosine decay), `ema`, `seed`, `minutes` (a wall-clock budget:
    the steps that fit, planned by a short probe, so `steps=` that count reproduces the run),
    `label_dropout`, `precision` (`"bf16"`: mixed precision, bf16 operands with f32 sums in the matrix
    products on a CPU with AVX-512 BF16; weights, optimiser and checkpoint f32); `config` a TOML file or dict
    with `[train]`/`[arch]` tables (keywords win).
    `state=PATH` with `checkpoint_every=N` writes the training state; `resume` (a path or a `TrainState`)
    continues a run bit for bit. `progress`: True (tqdm if installed), False, or `callback(step, loss)`.

    >>> teacher = flowmap.train_teacher("moons", steps=3000, hidden=256)
    """
    _threads(threads)
    d = _to_data(data, labels)
    cfg = _run_config(
        config, _train_settings(steps, batch, lr, ema, seed, minutes, label_dropout, precision=precision), None, arch_settings
    )
    total = None if minutes is not None else cfg.get("train", {}).get("steps") or _json.loads(_flowmap.train_defaults())["steps"]
    native = _flowmap.train_teacher(
        d._native,
        _json.dumps(cfg),
        arch,
        device,
        minutes,
        _progress(progress, total, "teacher"),
        None if state is None else _os.fspath(state),
        checkpoint_every,
        _resume(resume),
    )
    return Model(native)


_RUN_KEYWORDS = (
    "steps", "batch", "lr", "ema", "seed", "minutes", "label_dropout", "precision", "config", "device", "threads",
    "progress", "state", "checkpoint_every", "resume",
)


def _run_keywords(arguments):
    """The run keywords shared by `distill` and `train`, from a call's arguments."""
    return {k: arguments[k] for k in _RUN_KEYWORDS}


def _train_map(method, data, teacher, guide, init, guidance_range, settings, arch, arch_settings, run):
    """`train_map` of the native module with the run keywords `run` of `distill` and `train`."""
    _threads(run["threads"])
    train_settings = _train_settings(
        run["steps"], run["batch"], run["lr"], run["ema"], run["seed"], run["minutes"], run["label_dropout"], guidance_range,
        run["precision"],
    )
    cfg = _run_config(run["config"], train_settings, settings, arch_settings)
    total = None if run["minutes"] is not None else cfg.get("train", {}).get("steps") or _json.loads(_flowmap.train_defaults())["steps"]
    native = _flowmap.train_map(
        method,
        None if data is None else data._native,
        None if teacher is None else teacher._native,
        _json.dumps(cfg),
        arch,
        run["device"],
        None if guide is None else guide._native,
        None if init is None else init._native,
        run["minutes"],
        _progress(run["progress"], total, method or "distill"),
        None if run["state"] is None else _os.fspath(run["state"]),
        run["checkpoint_every"],
        _resume(run["resume"]),
    )
    return Model(native)


def distill(
    teacher,
    *,
    method=None,
    data=None,
    labels=None,
    steps=None,
    batch=None,
    lr=None,
    ema=None,
    seed=0,
    minutes=None,
    label_dropout=None,
    precision=None,
    guidance_range=None,
    guide=None,
    settings=None,
    config=None,
    device="cpu",
    threads=None,
    progress=True,
    state=None,
    checkpoint_every=None,
    resume=None,
):
    """Distils `teacher` (a `Model`, a checkpoint path, or `"gmm:mix.json"`) into a flow map by `method`
    (`flowmap.methods()` lists them: `emd`, `lmd`, `emd-cont`, `lmd-cont`, `cm`, `ctm`, `progressive`,
    `direct`, …). The student starts as the teacher (one Euler step) and learns `f(x, t, s) ≈ Φ_{t→s}(x)`.
    Without `method`, the recommended one-step recipe for the data (today `cm`, consistency distillation;
    the checkpoint's `metadata["training"]["recommended"]` gives the measurement that chose it).
    `minutes=M` instead of `steps` plans the steps that fit in M minutes (a short probe times a step); the
    same call with `steps=` that count reproduces the run bit for bit.

    `data` (default: the teacher's own) gives the states `x_t`. `guidance_range=(lo, hi)` distils
    classifier-free guidance into the map (it then takes `guidance=w`), by the null class or by `guide`, a
    weaker model (autoguidance). `settings` is the objective's `[distill]` table as a dict (`{"weighting":
    {"kind": "adaptive"}, "times": {"distribution": "logit-normal"}}`); the training keywords are those of
    `train_teacher`.

    >>> fmap = flowmap.distill(teacher, method="emd", steps=4000)
    """
    if isinstance(teacher, (str, _os.PathLike)):
        teacher = load(teacher, device)
    if isinstance(guide, (str, _os.PathLike)):
        guide = load(guide, device)
    d = None if data is None else _to_data(data, labels)
    if data is None and labels is not None:
        raise InvalidArgument("labels go with data")
    return _train_map(method, d, teacher, guide, None, guidance_range, settings, None, {}, _run_keywords(locals()))


def train(
    method,
    data,
    labels=None,
    *,
    arch=None,
    init=None,
    steps=None,
    batch=None,
    lr=None,
    ema=None,
    seed=0,
    minutes=None,
    label_dropout=None,
    precision=None,
    guidance_range=None,
    settings=None,
    config=None,
    device="cpu",
    threads=None,
    progress=True,
    state=None,
    checkpoint_every=None,
    resume=None,
    **arch_settings,
):
    """Trains a flow map from data alone by `method` (`meanflow`: `f = x + (s − t)·u` with
    `u = v − (t − s)·du/dt` (Geng et al. 2025); `self-lmd`, `shortcut`, …; `flowmap.methods()` lists them).
    `init` (a teacher `Model` or path) seeds the network with its weights. The other keywords are those of
    `train_teacher` and `distill`.

    >>> fmap = flowmap.train("meanflow", "checkerboard", steps=4000)
    """
    if isinstance(init, (str, _os.PathLike)):
        init = load(init, device)
    d = _to_data(data, labels)
    return _train_map(method, d, None, None, init, guidance_range, settings, arch, arch_settings, _run_keywords(locals()))


# ----------------------------------------------------------------------------------------------- evaluation


class Evaluation(list):
    """The rows of `flowmap.evaluate`, a list of flat dicts (one per sampler and NFE): `pandas.DataFrame(rows)`
    makes a table. Points: energy distance, MMD², Sliced Wasserstein (and the checkerboard's in-square rate);
    images: the data's floor first, then FD, precision, recall and class accuracy in a classifier's features.
    `exact_map` holds a flow map's error against the exact Φ where the data is a Gaussian mixture."""

    exact_map = None

    def to_pandas(self):
        """The rows as a `pandas.DataFrame`."""
        import pandas as pd

        return pd.DataFrame(list(self))


def _flat(row, prefix=""):
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}_"))
        else:
            out[prefix + k] = v
    return out


def evaluate(model, data=None, labels=None, nfe=(1, 2, 4, 8), n=10_000, seed=0, sampler=None, grid_power=1.0, guidance=None, guide=None):
    """Scores `model` on held-out `data` (default: its training data) at each NFE: a flow map on its k-step
    grids, a teacher with Euler at each NFE and adaptive dopri5. Returns an `Evaluation` (a list of dict
    rows).

    >>> rows = flowmap.evaluate(fmap, nfe=[1, 2, 4]); rows[0]["energy_distance"]
    """
    if isinstance(model, (str, _os.PathLike)):
        model = load(model)
    if isinstance(guide, (str, _os.PathLike)):
        guide = load(guide)
    d = None if data is None else _to_data(data, labels)
    nfes = [int(nfe)] if isinstance(nfe, int) else [int(k) for k in nfe]
    raw = _json.loads(
        _flowmap.evaluate(
            model._native,
            None if d is None else d._native,
            nfes,
            int(n),
            int(seed),
            sampler,
            float(grid_power),
            None if guidance is None else float(guidance),
            None if guide is None else guide._native,
        )
    )
    result = Evaluation(_flat(r) for r in raw["rows"])
    result.exact_map = raw.get("exact_map")
    return result


# ------------------------------------------------------------------------------------------------- registry


def methods():
    """The methods of the family, as dicts `{"name", "needs_teacher", "summary"}`: those that need a
    teacher go to `distill`, the others to `train`."""
    return [dict(name=n, needs_teacher=t, summary=s) for n, t, s in _flowmap.methods()]


def set_threads(n):
    """Sets the number of compute threads. Call it before the first computation; results are the same bits
    at any count."""
    if int(n) < 1:
        raise InvalidArgument(f"threads must be at least 1, got {n}")
    _flowmap.set_threads(int(n))
