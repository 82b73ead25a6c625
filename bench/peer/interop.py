#!/usr/bin/env python3
"""flowmap -> PyTorch: loads a flowmap U-Net flow map into the twin and checks it against `flowmap apply`.

    python3 bench/peer/interop.py --model map.safetensors [--flowmap target/release/flowmap] [--t 1 --s 0]

Draws noise images, runs `flowmap apply --model MAP --t T --s S` on them and the twin's
`FlowMap(net)(x, t, s, labels)` on the same inputs (labels i mod C, as `apply --class all` gives), and prints
the largest difference in the network's [-1, 1] scale. Deploying a flowmap map in PyTorch is the three
lines in `main` below: `Unet.from_flowmap`, `FlowMap`, call.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flowmap_unet import FlowMap, Unet  # noqa: E402 (bench/peer/flowmap_unet.py: the package's twins)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--flowmap", default="target/release/flowmap")
    p.add_argument("--t", type=float, default=1.0)
    p.add_argument("--s", type=float, default=0.0)
    p.add_argument("--n", type=int, default=8)
    args = p.parse_args()

    net, meta = Unet.from_flowmap(args.model)
    if not net.flow_map:
        sys.exit(f"{args.model} holds a {meta['kind']}, not a flow map")
    model = FlowMap(net).eval()
    scale = meta.get("scale") or {"lo": -1.0, "hi": 1.0}
    lo, hi = scale["lo"], scale["hi"]
    classes = net.cfg.get("num_classes")

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, *net.cfg["state_shape"], generator=gen).clamp(-1, 1)
    t, s = torch.full((args.n, 1), args.t), torch.full((args.n, 1), args.s)
    labels = torch.arange(args.n) % classes if classes else None
    with torch.no_grad():
        ours = model(x, t, s, labels)

    with tempfile.TemporaryDirectory() as d:
        inp, out = os.path.join(d, "x.npy"), os.path.join(d, "f.npy")
        np.save(inp, ((x.numpy() + 1) / 2 * (hi - lo) + lo).astype(np.float32))
        subprocess.run([args.flowmap, "--quiet", "apply", "--model", args.model, "--t", str(args.t), "--s",
                        str(args.s), "--input", inp, "--out", out], check=True)
        theirs = (np.load(out) - lo) / (hi - lo) * 2 - 1
    err = float(np.abs(ours.numpy() - theirs).max())
    print(f"max |PyTorch twin - flowmap| = {err:.2e} (in [-1, 1]); mean |f| = {ours.abs().mean():.3f}")
    sys.exit(0 if err <= 1e-5 else 1)


if __name__ == "__main__":
    main()
