#!/usr/bin/env python3
"""On paper: what a data-parallel step moves, and the interconnect it needs for 90% scaling efficiency.

Bytes: every rank's f32 gradient, once per step (the parameter counts are those of the default networks'
checkpoints: `flowmap teacher --data mnist` and `--data checkerboard`, and their maps). A ring all-reduce
moves 2(N-1)/N of the buffer through each rank's link and pays 2(N-1) latencies; a tree, 2 log2 N
latencies. Without overlap, 90% efficiency asks the reduction to take at most 1/9 of the compute step; with
the reduction overlapped with the backward pass (about 2/3 of a step), up to 2/3 of it.

Usage: python3 bench/distributed/projection.py > bench/distributed/projection.md
"""
import math

NETS = {  # trainable parameters
    "U-Net teacher (MNIST default)": 1_093_089,
    "U-Net map (MNIST default)": 1_101_281,
    "MLP teacher (points default)": 141_058,
    "MLP map (points default)": 149_250,
}
STEP_MS = [10.0, 50.0]  # per-GPU compute step (forward + backward + optimiser), assumed
ALPHA_US = 5.0  # per-hop latency of a modern fabric (NVLink / InfiniBand), assumed
WORLD = [8, 64, 512]

print("# Data-parallel traffic, on paper\n")
print("Produced by `python3 bench/distributed/projection.py`. Assumed: per-hop latency "
      f"{ALPHA_US:g} µs; per-GPU compute steps of {' and '.join(f'{s:g} ms' for s in STEP_MS)}.\n")
print("| network | gradient per step | ranks | ring bytes per rank | ring latency | tree latency | "
      + " | ".join(f"bandwidth for 90%, {s:g} ms step, no overlap" for s in STEP_MS) + " |")
print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(STEP_MS))
for name, p in NETS.items():
    size = 4 * p
    for n in WORLD:
        moved = 2 * (n - 1) / n * size
        ring_lat = 2 * (n - 1) * ALPHA_US * 1e-6
        tree_lat = 2 * math.log2(n) * ALPHA_US * 1e-6
        cells = []
        for s in STEP_MS:
            budget = s * 1e-3 / 9 - tree_lat  # the better of the two algorithms' latency
            cells.append("latency-bound" if budget <= 0 else f"{moved / budget / 1e9:.1f} GB/s")
        print(f"| {name} | {size / 1e6:.2f} MB | {n} | {moved / 1e6:.2f} MB | {ring_lat * 1e3:.2f} ms | "
              f"{tree_lat * 1e3:.3f} ms | " + " | ".join(cells) + " |")
