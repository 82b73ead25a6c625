#!/usr/bin/env python3
"""Writes the PyTorch -> flowmap interop fixture that flowmap's CI checks (`crates/flowmap/tests/interop.rs`;
CI has no torch): a small class-conditional U-Net twin, randomly initialised (every tensor non-zero, the
GroupNorm affine maps too), saved two ways, with inputs and the twin's outputs.

- `teacher.safetensors`: `safetensors.torch.save_file(model.state_dict())`, no metadata; its architecture is
  `arch.toml` (an `[arch]` table, as `flowmap distill --teacher teacher.safetensors --config arch.toml`
  reads it).
- `flow_map.safetensors`: a flow-map twin written by `save_flowmap` (the state dict plus the `flowmap`
  metadata entry), which flowmap reads with nothing else.
- `x.npy` (4 x 1 x 8 x 8), `t.npy`, `s.npy` (4 x 1, s <= t), `labels.npy` (4 int64, the last the null class 3);
  `teacher_v.npy` = v(x, t, labels) and `map_f.npy` = f(x, t, s, labels) = x + (s - t) F(x, t, s, labels).

Usage: python3 bench/peer/make_interop_fixture.py crates/flowmap/tests/fixtures/torch-unet
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flowmap_unet import FlowMap, Unet, config, save_flowmap  # noqa: E402 (bench/peer/flowmap_unet.py: the package's twins)

SETTINGS = dict(channels=8, channel_mult=[1, 2], blocks=1, attention_resolutions=[4], heads=2, groups=4,
                time_features=4, max_frequency=20.0, num_classes=3)
ARCH_TOML = """# The architecture of teacher.safetensors (a plain PyTorch state dict), for
# flowmap distill --teacher teacher.safetensors --config arch.toml --data ...
[arch]
kind = "unet"
channels = 8
channel_mult = [1, 2]
blocks = 1
attention_resolutions = [4]
heads = 2
groups = 4
time_features = 4
max_frequency = 20.0
num_classes = 3
"""


def randomise(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    cfg = config([1, 8, 8], **SETTINGS)
    teacher, net = Unet(cfg), Unet(cfg, flow_map=True)
    randomise(teacher, gen)
    randomise(net, gen)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([[0.9], [0.5], [0.3], [1.0]])
    s = torch.tensor([[0.2], [0.5], [0.0], [0.0]])
    labels = torch.tensor([0, 2, 1, 3])
    with torch.no_grad():
        v = teacher(x, t, labels=labels)
        f = FlowMap(net)(x, t, s, labels)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, os.path.join(out, "teacher.safetensors"))
    save_flowmap(net, os.path.join(out, "flow_map.safetensors"), data="interop-fixture")
    with open(os.path.join(out, "arch.toml"), "w") as fh:
        fh.write(ARCH_TOML)
    for name, a in [("x", x), ("t", t), ("s", s), ("teacher_v", v), ("map_f", f)]:
        np.save(os.path.join(out, f"{name}.npy"), a.numpy().astype(np.float32))
    np.save(os.path.join(out, "labels.npy"), labels.numpy().astype(np.int64))
    print(f"wrote {out}: |v| = {v.abs().mean():.3f}, |f - x| = {(f - x).abs().mean():.3f}")


if __name__ == "__main__":
    main()
