"""flowmap.torch: the PyTorch twins agree with flowmap in both directions, to 1e-5."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import flowmap  # noqa: E402
import flowmap.torch as fmt  # noqa: E402


def _close(a, b, tol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= tol * scale, np.abs(a - b).max()


def test_mlp_map_and_teacher_agree(tmp_path, teacher, fmap):
    x = fmap.sample(64, nfe=2, seed=1)
    t = np.linspace(0.2, 1.0, 64).astype(np.float32)
    s = (t * 0.3).astype(np.float32)
    for model in (fmap,):
        p = tmp_path / "map.safetensors"
        model.save(p)
        twin = fmt.load(p)
        assert isinstance(twin, fmt.FlowMap) and twin.meta["kind"] == "flow_map"
        with torch.no_grad():
            y = twin(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(s)).numpy()
        _close(y, model(x, t, s))
    p = tmp_path / "teacher.safetensors"
    teacher.save(p)
    twin = fmt.load(p)
    assert isinstance(twin, fmt.Teacher)
    with torch.no_grad():
        v = twin(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    _close(v, teacher.velocity(x, t))


def test_unet_teacher_agrees_with_classes(tmp_path, image_teacher, digits):
    images, labels = digits
    p = tmp_path / "unet.safetensors"
    image_teacher.save(p)
    twin = fmt.load(p)
    x = (images[:6, None].astype(np.float32) / 127.5 - 1.0)
    t = np.full(6, 0.7, np.float32)
    with torch.no_grad():
        v = twin(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(labels[:6].astype(np.int64))).numpy()
    # The package takes images in the data's range (uint8 here) and returns the velocity in [−1, 1] units.
    _close(v, image_teacher.velocity(images[:6, None].astype(np.float32), t, classes=labels[:6]))


def test_a_torch_teacher_distils_in_flowmap(tmp_path):
    """A teacher built and saved in PyTorch loads in flowmap with the same velocity, and distils."""
    torch.manual_seed(0)
    twin = fmt.build({"kind": "mlp", "dim": 2, "hidden": 32, "depth": 2, "time_features": 8, "max_frequency": 16.0})
    p = tmp_path / "torch-teacher.safetensors"
    fmt.save(twin, p, data="moons")
    teacher = flowmap.load(p)
    assert teacher.kind == "teacher" and teacher.config["hidden"] == 32
    x = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    t = np.random.default_rng(1).random(50).astype(np.float32)
    with torch.no_grad():
        v = twin(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    _close(teacher.velocity(x, t), v)
    m = flowmap.distill(p, method="emd", steps=5, batch=64, progress=False)
    assert m.kind == "flow_map"
    # And the distilled map comes back into PyTorch with the same outputs.
    m.save(tmp_path / "m.safetensors")
    back = fmt.load(tmp_path / "m.safetensors")
    with torch.no_grad():
        y = back(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(t * 0.5)).numpy()
    _close(y, m(x, t, t * 0.5))


def test_twin_sampling_matches_the_map_it_runs(fmap, tmp_path):
    """fmt.sample walks the same uniform grid: from the same noise, the same samples as f applied by hand."""
    fmap.save(tmp_path / "m.safetensors")
    twin = fmt.load(tmp_path / "m.safetensors")
    x = fmt.sample(twin, 32, nfe=2, seed=0).numpy()
    g = torch.Generator().manual_seed(0)
    z = torch.randn([32, 2], generator=g).numpy()
    _close(x, fmap(fmap(z, 1.0, 0.5), 0.5, 0.0))
