"""flowmap from Python, end to end: train a teacher on points, distil it into a flow map, sample in one and
two steps, score both against held-out data, and run the same map in PyTorch.

    pip install ./python && python examples/python/quickstart.py
"""

import os
import sys
import tempfile

import numpy as np

import flowmap

# 1. A flow-matching teacher on the checkerboard: v(x, t) ≈ E[x1 − x0 | x_t = x].
teacher = flowmap.train_teacher("checkerboard", steps=1500, batch=512, seed=0)

# 2. Distil it: an Eulerian map-distillation student f(x, t, s) ≈ Φ_{t→s}(x), started as the teacher.
fmap = flowmap.distill(teacher, method="emd", steps=800, batch=512, seed=0)

# 3. Sample: one network evaluation per point, or two.
x1 = fmap.sample(10_000, nfe=1)
x2 = fmap.sample(10_000, nfe=2)
print(f"samples: {x1.shape} {x1.dtype}, mean {x1.mean(0).round(3)}")

# 4. Score against held-out data (energy distance: 0 for the data itself); the teacher with Euler and dopri5.
rows = flowmap.evaluate(fmap, nfe=[1, 2], n=5000) + flowmap.evaluate(teacher, nfe=[8], n=5000)
for r in rows:
    print(f"{r['model']:>9} {r['sampler']:<22} NFE {r['nfe']:>3}  energy distance {r['energy']:.4f}")

# 5. Save, and load the map into PyTorch: the same network, the same outputs.
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "map.safetensors")
    fmap.save(path)
    try:
        import torch

        import flowmap.torch as fmt
    except ImportError:
        print("PyTorch not installed: skipping the PyTorch step")
        sys.exit(0)
    net = fmt.load(path)
    z = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(z), 1.0, 0.0).numpy()
    gap = np.abs(y - fmap(z, 1.0, 0.0)).max()
    print(f"PyTorch twin vs flowmap, f(z, 1, 0): max difference {gap:.1e}")
    assert gap < 1e-5
