"""PyTorch twins of flowmap's backbones: the MLP (`crates/flowmap/src/backbone/mlp.rs`) and the U-Net
(`crates/flowmap/src/backbone/unet/`).

The same layers, in the same order, with the same parameter names and shapes, so that one safetensors file
loads in both: `flowmap.torch.load("model.safetensors")` gives an `nn.Module` for any flowmap teacher or map
checkpoint (its architecture from the `flowmap` metadata entry), and `flowmap.torch.save(module, path, ...)`
writes a file that `flowmap.distill(teacher=...)`, `flowmap distill --teacher PATH` or `flowmap sample
--model PATH` reads as it is. This file needs only torch (and safetensors to read and write files); the
benchmarks copy it beside their PyTorch peers.

    import flowmap.torch as fmt
    model = fmt.load("map.safetensors")           # a FlowMap: model(x, t, s, labels=None, w=None)
    x = fmt.sample(model, 16, nfe=2)               # 16 samples in two steps, in [-1, 1] for images

Conventions (flowmap's): time runs from data t = 0 to noise t = 1; a flow map goes down, 0 <= s <= t <= 1;
images are B x C x H x W in [-1, 1]; class labels are in 0..C, and C is the null class (no label).

- Teacher: `v = model(x, t, labels=labels)`, the velocity of the probability-flow ODE dx/dt = v(x, t).
- Flow map: `model(x, t, gap=t - s, labels=labels)` is the average velocity F(x, t, s), and the map is
  `f(x, t, s) = x + (s - t) * F(x, t, s)` (`FlowMap.forward`).

The network:

    emb  = Linear(SiLU(Linear([sin/cos(w t), e_c, sin/cos(w (t - s))])))      E = 4 * channels
    h    = Conv3x3(x)
    down: per level, `blocks` residual blocks (+ attention at listed resolutions), then 2 x 2 mean pool
    mid:  residual block, attention, residual block
    up:   per level (lowest first), `blocks + 1` residual blocks on [h, skip] (+ attention), then nearest 2x
    out  = Conv3x3(SiLU(GroupNorm(h)))

A residual block is `skip(h) + Conv(Dropout(SiLU(GN(Conv(SiLU(GN(h)))) * (1 + scale) + shift)))` with
`(scale, shift) = Linear(SiLU(emb))`. Written as a PyTorch user writes it: stock modules, no fused tricks.
"""

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULTS = dict(
    channels=32,
    channel_mult=[1, 2, 2],
    blocks=1,
    attention_resolutions=[7],
    heads=1,
    groups=8,
    dropout=0.0,
    time_features=32,
    max_frequency=200.0,
    num_classes=None,
    guidance=None,
)


def config(state_shape, **settings):
    """A complete U-Net configuration (flowmap's `UnetConfig`): defaults filled in."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown U-Net settings: {sorted(unknown)}")
    cfg = dict(DEFAULTS, **settings)
    cfg["state_shape"] = list(state_shape)
    return cfg


class TimeEmbedding(nn.Module):
    """[sin(w_k t), cos(w_k t)] for K frequencies geometric from 1 to `max_frequency`."""

    def __init__(self, features, max_frequency):
        super().__init__()
        k = max(features, 1)
        freqs = [max_frequency ** (i / (k - 1)) if k > 1 else 1.0 for i in range(k)]
        self.register_buffer("freqs", torch.tensor(freqs, dtype=torch.float64).float()[None, :], persistent=False)

    def forward(self, t):
        arg = t * self.freqs
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, cfg):
        super().__init__()
        e = 4 * cfg["channels"]
        self.norm1 = nn.GroupNorm(cfg["groups"], c_in, eps=1e-5)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(e, 2 * c_out)
        self.norm2 = nn.GroupNorm(cfg["groups"], c_out, eps=1e-5)
        self.dropout = nn.Dropout(cfg["dropout"])
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, act_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(act_emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        h = self.conv2(self.dropout(h))
        return (x if self.skip is None else self.skip(x)) + h


class Attention(nn.Module):
    """Self-attention over the H * W positions, residual, GroupNorm in front."""

    def __init__(self, channels, heads, groups):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        b, c, h, w = x.shape
        d = c // self.heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # B x N x C
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)
        o = (p @ v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.proj(o).transpose(1, 2).reshape(b, c, h, w)


class Stage(nn.Module):
    def __init__(self, c_in, c_out, attends, cfg):
        super().__init__()
        self.res = ResBlock(c_in, c_out, cfg)
        self.attn = Attention(c_out, cfg["heads"], cfg["groups"]) if attends else None

    def forward(self, x, act_emb):
        h = self.res(x, act_emb)
        return h if self.attn is None else self.attn(h)


class Mid(nn.Module):
    def __init__(self, ch, cfg):
        super().__init__()
        self.res0 = ResBlock(ch, ch, cfg)
        self.attn = Attention(ch, cfg["heads"], cfg["groups"])
        self.res1 = ResBlock(ch, ch, cfg)

    def forward(self, h, act_emb):
        return self.res1(self.attn(self.res0(h, act_emb)), act_emb)


class Out(nn.Module):
    def __init__(self, ch, c_img, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-5)
        self.conv = nn.Conv2d(ch, c_img, 3, padding=1)

    def forward(self, h):
        return self.conv(F.silu(self.norm(h)))



def _conditioning(net, t, gap, labels, w):
    """What a network is conditioned on, in flowmap's order: `emb(t)`, the class embedding (the null class
    when `labels` is None), `emb(t - s)` for a flow map, and `emb(w / 4)` for a guidance-distilled one."""
    parts = [net.time(t)]
    if net.class_embedding is not None:
        if labels is None:
            labels = torch.full((t.shape[0],), net.cfg["num_classes"], dtype=torch.long, device=t.device)
        parts.append(net.class_embedding(labels))
    if net.flow_map:
        parts.append(net.time(gap))
    if net.guidance is not None:
        if w is None:
            raise ValueError(f"this flow map has guidance distilled into it (w in {net.cfg['guidance']}): pass w")
        parts.append(net.guidance(w * 0.25))
    return parts


MLP_DEFAULTS = dict(hidden=256, depth=3, time_features=16, max_frequency=64.0, num_classes=None, guidance=None)


class Mlp(nn.Module):
    """flowmap's MLP on flattened states: `[x, emb(t), e_c, emb(t - s), emb(w / 4)]` through `depth` SiLU
    layers of width `hidden` and a linear output. `flow_map=True` adds the embedding of the gap t - s."""

    def __init__(self, cfg, flow_map=False):
        super().__init__()
        self.cfg = cfg = dict(cfg)
        self.flow_map = flow_map
        self.state_shape = list(cfg.get("state_shape") or [cfg["dim"]])
        self.time = TimeEmbedding(cfg["time_features"], cfg["max_frequency"])
        e = 2 * max(cfg["time_features"], 1)
        in_dim = cfg["dim"] + (2 if flow_map else 1) * e
        self.class_embedding = None
        if cfg.get("num_classes") is not None:
            self.class_embedding = nn.Embedding(cfg["num_classes"] + 1, e)
            in_dim += e
        self.guidance = None
        if cfg.get("guidance") is not None:
            self.guidance = TimeEmbedding(cfg["time_features"], 16.0)
            in_dim += e
        for i in range(cfg["depth"]):
            setattr(self, f"layer{i}", nn.Linear(in_dim, cfg["hidden"]))
            in_dim = cfg["hidden"]
        setattr(self, f"layer{cfg['depth']}", nn.Linear(in_dim, cfg["dim"]))

    def forward(self, x, t, gap=None, labels=None, w=None):
        """`x`: B x D (or B x state shape); `t`, `gap`: B x 1; `labels`: B integers (the null class when
        None); `w`: B x 1 guidance scales (guidance-distilled flow maps only)."""
        if (gap is not None) != self.flow_map:
            raise ValueError("a flow map's network takes the gap t - s, a teacher's does not")
        h = torch.cat([x.reshape(x.shape[0], -1)] + _conditioning(self, t, gap, labels, w), dim=1)
        depth = self.cfg["depth"]
        for i in range(depth):
            h = F.silu(getattr(self, f"layer{i}")(h))
        return getattr(self, f"layer{depth}")(h).reshape(x.shape)


class Unet(nn.Module):
    """flowmap's U-Net. `flow_map=True` adds the embedding of the gap t - s (a flow map's network)."""

    def __init__(self, cfg, flow_map=False):
        super().__init__()
        self.cfg = cfg = dict(cfg)
        self.flow_map = flow_map
        c_img, height, _ = cfg["state_shape"]
        ch0, e = cfg["channels"], 4 * cfg["channels"]
        self.time = TimeEmbedding(cfg["time_features"], cfg["max_frequency"])
        emb_in = 2 * max(cfg["time_features"], 1) * (2 if flow_map else 1)
        self.guidance = None
        if cfg.get("guidance") is not None:  # a guidance-distilled flow map: w embedded last
            self.guidance = TimeEmbedding(cfg["time_features"], 16.0)
            emb_in += 2 * max(cfg["time_features"], 1)
        self.class_embedding = None
        if cfg.get("num_classes") is not None:
            self.class_embedding = nn.Embedding(cfg["num_classes"] + 1, e)
            emb_in += e
        self.emb = nn.ModuleList([nn.Linear(emb_in, e), nn.Linear(e, e)])
        self.input = nn.Conv2d(c_img, ch0, 3, padding=1)
        levels = len(cfg["channel_mult"])
        attends = lambda level: (height >> level) in cfg["attention_resolutions"]
        skips, ch = [ch0], ch0
        self.down = nn.ModuleList()
        for level, m in enumerate(cfg["channel_mult"]):
            stages = nn.ModuleList()
            for _ in range(cfg["blocks"]):
                stages.append(Stage(ch, m * ch0, attends(level), cfg))
                ch = m * ch0
                skips.append(ch)
            if level + 1 < levels:
                skips.append(ch)
            self.down.append(stages)
        self.mid = Mid(ch, cfg)
        up = [None] * levels
        for level in reversed(range(levels)):
            stages = nn.ModuleList()
            for _ in range(cfg["blocks"] + 1):
                out = cfg["channel_mult"][level] * ch0
                stages.append(Stage(ch + skips.pop(), out, attends(level), cfg))
                ch = out
            up[level] = stages
        self.up = nn.ModuleList(up)  # named by level, run lowest level first
        self.out = Out(ch, c_img, cfg["groups"])

    def embedding(self, t, gap, labels, w=None):
        parts = _conditioning(self, t, gap, labels, w)
        return F.silu(self.emb[1](F.silu(self.emb[0](torch.cat(parts, dim=1)))))

    def forward(self, x, t, gap=None, labels=None, w=None):
        """`x`: B x C x H x W; `t`, `gap`: B x 1; `labels`: B integers (the null class when None); `w`: B x 1
        guidance scales (guidance-distilled flow maps only)."""
        if (gap is not None) != self.flow_map:
            raise ValueError("a flow map's network takes the gap t - s, a teacher's does not")
        act_emb = self.embedding(t, gap, labels, w)
        h = self.input(x)
        skips = [h]
        levels = len(self.down)
        for level, stages in enumerate(self.down):
            for stage in stages:
                h = stage(h, act_emb)
                skips.append(h)
            if level + 1 < levels:
                h = F.avg_pool2d(h, 2)
                skips.append(h)
        h = self.mid(h, act_emb)
        for i, stages in enumerate(reversed(self.up)):
            for stage in stages:
                h = stage(torch.cat([h, skips.pop()], dim=1), act_emb)
            if i + 1 < levels:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.out(h)

    def zero_init_(self):
        """ADM's zero-initialised last layers, as flowmap starts: each residual branch's last convolution,
        each attention's output projection and the output convolution."""
        for name, p in self.named_parameters():
            if ".conv2." in name or ".attn.proj." in name or name.startswith("out.conv."):
                nn.init.zeros_(p)
        return self

    @staticmethod
    def from_flowmap(path, map_location="cpu"):
        """The network of a flowmap U-Net checkpoint (teacher or flow map), weights loaded."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["flowmap"])
        arch = dict(meta["arch"])
        if arch.pop("kind") != "unet":
            raise ValueError(f"{path} holds a {meta['arch']['kind']} network, not a U-Net")
        model = Unet(config(arch.pop("state_shape"), **arch), flow_map=meta["kind"] != "teacher")
        model.load_state_dict(load_file(path, device=map_location))
        return model, meta


class FlowMap(nn.Module):
    """f(x, t, s) = x + (s - t) * F(x, t, s), with F a flow-map network (an `Mlp` or `Unet` built with
    `flow_map=True`). `t`, `s`: B x 1 (or numbers)."""

    def __init__(self, net):
        super().__init__()
        if not net.flow_map:
            raise ValueError("a FlowMap wraps a flow-map network (built with flow_map=True)")
        self.net = net

    def forward(self, x, t, s, labels=None, w=None):
        t, s = _column(t, x), _column(s, x)
        gap = (s - t).reshape(-1, *([1] * (x.dim() - 1)))
        return x + gap * self.net(x, t, t - s, labels, w)


class Teacher(nn.Module):
    """The velocity v(x, t) of a teacher network (an `Mlp` or `Unet` built with `flow_map=False`)."""

    def __init__(self, net):
        super().__init__()
        if net.flow_map:
            raise ValueError("a Teacher wraps a velocity network (built with flow_map=False)")
        self.net = net

    def forward(self, x, t, labels=None):
        return self.net(x, _column(t, x), None, labels)


def _column(t, x):
    """`t` as a B x 1 tensor on `x`'s device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, 1).expand(x.shape[0], 1) if t.numel() == 1 else t.reshape(-1, 1)


def _network(arch, flow_map):
    arch = dict(arch)
    kind = arch.pop("kind")
    if kind == "unet":
        return Unet(config(arch.pop("state_shape"), **arch), flow_map=flow_map)
    if kind == "mlp":
        unknown = set(arch) - set(MLP_DEFAULTS) - {"dim", "state_shape"}
        if unknown:
            raise ValueError(f"unknown MLP settings: {sorted(unknown)}")
        return Mlp(dict(MLP_DEFAULTS, **arch), flow_map=flow_map)
    raise ValueError(f"unknown architecture '{kind}' (expected mlp or unet)")


def load(path, map_location="cpu"):
    """The model of a flowmap checkpoint as an `nn.Module`, weights loaded: a `FlowMap` for a flow map or
    consistency model, a `Teacher` for a teacher. Its checkpoint metadata is on `.meta`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        raw = (f.metadata() or {}).get("flowmap")
    if raw is None:
        raise ValueError(f"{path} has no flowmap metadata: build the network and load its state dict yourself")
    meta = json.loads(raw)
    flow_map = meta["kind"] != "teacher"
    net = _network(meta["arch"], flow_map)
    net.load_state_dict(load_file(path, device=str(map_location)))
    model = FlowMap(net) if flow_map else Teacher(net)
    model.meta = meta
    return model


def build(arch, kind="teacher"):
    """A fresh network of `arch` (a flowmap `[arch]` table with its `kind`, `mlp` or `unet`, and
    `state_shape` for a U-Net or `dim` for an MLP) wrapped as a `Teacher` or a `FlowMap`."""
    flow_map = kind != "teacher"
    net = _network(arch, flow_map)
    return FlowMap(net) if flow_map else Teacher(net)


@torch.no_grad()
def sample(model, n, nfe=1, labels=None, w=None, seed=0, device="cpu"):
    """`n` samples of a `FlowMap` in `nfe` deterministic steps on the uniform grid 1 -> 0 (or of a `Teacher`
    by `nfe` Euler steps), from seeded noise. Images come out in [-1, 1]."""
    net = model.net
    shape = list(getattr(net, "state_shape", None) or net.cfg["state_shape"])
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn([n] + shape, generator=g).to(device)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1).expand(n)
    if w is not None:
        w = torch.full((n, 1), float(w), device=device)
    times = [1.0 - i / nfe for i in range(nfe + 1)]
    for t, s in zip(times[:-1], times[1:]):
        if isinstance(model, FlowMap):
            x = model(x, t, s, labels, w)
        else:
            x = x + (s - t) * model(x, t, labels)
    return x


def save(module, path, data, scale=None, path_name="linear", training=None, version="torch"):
    """Writes `module` (a `Teacher`, a `FlowMap`, or a bare `Mlp`/`Unet`) as a flowmap checkpoint: its
    `state_dict` plus the `flowmap` metadata entry (kind, architecture, path, data), so that flowmap reads it
    with no other file. `data` is the spec of the data it was trained on (`"mnist"`, `"checkerboard"`, a
    file); `scale` the `{"lo": ..., "hi": ...}` image range it was mapped from (MNIST: 0 and 255)."""
    from safetensors.torch import save_file

    net = module.net if isinstance(module, (FlowMap, Teacher)) else module
    kind = "unet" if isinstance(net, Unet) else "mlp"
    arch = dict(kind=kind, **net.cfg)
    for optional in ("num_classes", "guidance", "state_shape"):
        if arch.get(optional) is None:
            arch.pop(optional, None)
    meta = dict(
        kind="flow_map" if net.flow_map else "teacher",
        arch=arch,
        path=path_name,
        data=data,
        mixture=None,
        training=training if training is not None else {"trained_by": "pytorch"},
        version=version,
    )
    if scale is not None:
        meta["scale"] = scale
    prefix = "net." if isinstance(module, (FlowMap, Teacher)) else ""
    tensors = {k[len(prefix):]: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, path, metadata={"flowmap": json.dumps(meta)})


def save_flowmap(model, path, data="mnist", version="torch-twin", scale=None, training=None):
    """`save` for a bare U-Net twin (the benchmarks' name)."""
    save(model, path, data=data, scale=scale, training=training, version=version)
