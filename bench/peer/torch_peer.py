#!/usr/bin/env python3
"""PyTorch peer for `flowmap bench speed`.

The same three workloads as flowmap's speed benchmark, written the way a PyTorch user would write them:

- `teacher`: one conditional flow-matching training step of the velocity MLP v(x, t)
  (x_t = (1 - t) x0 + t x1, target x1 - x0, MSE, AdamW, then an EMA update of the weights);
- `emd`: one discrete Eulerian map-distillation step of the flow map F(x, t, s) from a frozen teacher
  (a quarter of the batch on the diagonal s = t, regressed on the teacher velocity; the rest regressed on
  sg[eps v + (1 - eps) F(x_t', t', s)] with t' = t + eps (s - t), x_t' = x_t + eps (s - t) v, weight 1/eps^2;
  AdamW, then an EMA update);
- `sample`: one-step generation f(x1, 1, 0) = x1 - F(x1, 1, 0) under `torch.inference_mode()`, and the
  teacher's 32-step Euler sampler for comparison.

Architecture (identical to flowmap's `ConditionedMlp`): input [x, sin(w t), cos(w t)] (+ [sin(w g), cos(w g)]
with g = t - s for the flow map), frequencies w geometric from 1 to `max_frequency`; `depth` hidden Linear
layers of width `width` with SiLU; a Linear read-out to the data dimension.

Usage: python3 bench/peer/torch_peer.py --threads 2 --widths 256,512 --batches 256,1024,4096
Prints one JSON document on stdout. Dependency: `pip install torch` (nothing else).
"""

import argparse
import json
import math
import resource
import time

import torch
from torch import nn


class TimeEmbedding(nn.Module):
    def __init__(self, features, max_frequency):
        super().__init__()
        k = max(features, 1)
        freqs = [max_frequency ** (i / (k - 1)) if k > 1 else 1.0 for i in range(k)]
        self.register_buffer("freqs", torch.tensor(freqs, dtype=torch.float32)[None, :])

    def forward(self, t):
        arg = t * self.freqs
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class ConditionedMlp(nn.Module):
    def __init__(self, dim, width, depth, time_features, max_frequency, with_gap):
        super().__init__()
        self.embed = TimeEmbedding(time_features, max_frequency)
        self.with_gap = with_gap
        in_dim = dim + (2 if with_gap else 1) * 2 * time_features
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(in_dim, width), nn.SiLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x, t, s=None):
        parts = [x, self.embed(t)]
        if self.with_gap:
            parts.append(self.embed(t - s))
        return self.net(torch.cat(parts, dim=1))


def checkerboard(n, generator):
    x1 = torch.rand(n, generator=generator) * 4 - 2
    x2 = torch.rand(n, generator=generator) - torch.randint(0, 2, (n,), generator=generator) * 2.0
    x2 = x2 + (torch.floor(x1) % 2)
    return torch.stack([x1, x2], dim=1)


def ema_update(ema, live, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1.0 - decay)


# `--device`: where the peer runs (cpu, cuda, cuda:N). It becomes torch's default device, so every tensor,
# model and generator is made there; timings wait for the device's queued work.
def use_device(spec):
    torch.set_default_device(spec)


def device_type():
    return torch.get_default_device().type


def generator(seed):
    """A seeded generator on the default device (a CPU generator cannot draw CUDA tensors)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def sync():
    if device_type() == "cuda":
        torch.cuda.synchronize()


def timed(fn, min_seconds, min_iters=3, warmup=3):
    for _ in range(warmup):
        fn()
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        fn()
        sync()
        iters += 1
        elapsed = time.perf_counter() - start
        if iters >= min_iters and elapsed >= min_seconds:
            return iters / elapsed, iters


# `--autocast bf16`: every model's forward pass runs under `torch.autocast(device, dtype=torch.bfloat16)`,
# as a PyTorch user turns on mixed precision; losses, the optimiser and the EMA stay f32.
AUTOCAST = [False]


def autocast(model):
    """`model` with its forward pass under bf16 autocast when `--autocast bf16` asked for it."""
    if AUTOCAST[0]:
        model.forward = torch.autocast(device_type(), dtype=torch.bfloat16)(model.forward)
    return model


def make_models(args, width):
    torch.manual_seed(args.seed)
    common = dict(dim=2, width=width, depth=args.depth, time_features=args.time_features,
                  max_frequency=args.max_frequency)
    teacher = autocast(ConditionedMlp(with_gap=False, **common))
    student = autocast(ConditionedMlp(with_gap=True, **common))
    return teacher, student


def bench_teacher(args, width, batch, data, gen):
    model, _ = make_models(args, width)
    ema = ConditionedMlp(2, width, args.depth, args.time_features, args.max_frequency, False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def step():
        x0 = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        x1 = torch.randn(batch, 2, generator=gen)
        t = torch.rand(batch, 1, generator=gen)
        xt = (1 - t) * x0 + t * x1
        loss = ((model(xt, t) - (x1 - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, 0.999)

    return timed(step, args.seconds)


def bench_emd(args, width, batch, data, gen):
    teacher, model = make_models(args, width)
    for p in teacher.parameters():
        p.requires_grad_(False)
    ema = ConditionedMlp(2, width, args.depth, args.time_features, args.max_frequency, True)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    eps = 0.1
    n_diag = round(batch * 0.25)

    def step():
        x0 = data[torch.randint(0, data.shape[0], (batch,), generator=gen)]
        x1 = torch.randn(batch, 2, generator=gen)
        a = torch.rand(batch, 1, generator=gen)
        c = torch.rand(batch, 1, generator=gen)
        t = torch.maximum(a, c).clamp_min(1e-3)
        s = torch.minimum(torch.minimum(a, c), t - 1e-3).clamp_min(0.0)
        t[:n_diag] = a[:n_diag]
        s[:n_diag] = a[:n_diag]
        xt = (1 - t) * x0 + t * x1
        xd, td = xt[:n_diag], t[:n_diag]
        xo, to, so = xt[n_diag:], t[n_diag:], s[n_diag:]
        with torch.no_grad():
            vd = teacher(xd, td)
            vo = teacher(xo, to)
            step_ = eps * (so - to)
            f_mid = model(xo + step_ * vo, to + step_, so)
            target = eps * vo + (1 - eps) * f_mid
        loss_d = ((model(xd, td, td) - vd) ** 2).mean()
        loss_o = ((model(xo, to, so) - target) ** 2).mean() / eps ** 2
        loss = loss_d * (n_diag / batch) + loss_o * ((batch - n_diag) / batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, 0.999)

    return timed(step, args.seconds)


def bench_sampling(args, width, batch):
    teacher, model = make_models(args, width)
    gen = generator(args.seed)
    x = torch.randn(batch, 2, generator=gen)
    one = torch.ones(batch, 1)
    zero = torch.zeros(batch, 1)

    @torch.inference_mode()
    def one_step():
        return x + (zero - one) * model(x, one, zero)

    @torch.inference_mode()
    def euler32():
        y = x
        for k in range(32):
            t = 1.0 - k / 32
            y = y - (1.0 / 32) * teacher(y, torch.full((batch, 1), t))
        return y

    return timed(one_step, args.seconds), timed(euler32, args.seconds)


def sgemm_peak(seconds):
    """GEMM GFLOP/s at two shapes, in f32 (bf16 operands under `--autocast bf16`)."""
    best = {}
    for m, k, n in [(4096, 256, 256), (4096, 512, 512)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        if AUTOCAST[0]:
            a, b = a.bfloat16(), b.bfloat16()
        rate, _ = timed(lambda: a @ b, seconds)
        best[f"{m}x{k}x{n}"] = 2.0 * m * k * n * rate / 1e9
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--widths", default="256,512")
    p.add_argument("--batches", default="256,1024,4096")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--time-features", type=int, default=16)
    p.add_argument("--max-frequency", type=float, default=64.0)
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args()
    AUTOCAST[0] = args.autocast == "bf16"
    use_device(args.device)
    torch.set_num_threads(args.threads)
    gen = generator(args.seed)
    data = checkerboard(100_000, gen)
    rows = []
    for width in [int(w) for w in args.widths.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            for name, fn in [("teacher", bench_teacher), ("emd", bench_emd)]:
                rate, iters = fn(args, width, batch, data, gen)
                rows.append(dict(workload=name, width=width, batch=batch, per_second=rate, iters=iters))
            (one, _), (euler, _) = bench_sampling(args, width, batch)
            rows.append(dict(workload="sample-1nfe", width=width, batch=batch, per_second=one * batch))
            rows.append(dict(workload="sample-euler32", width=width, batch=batch, per_second=euler * batch))
        (one, _), _ = bench_sampling(args, width, 1)
        rows.append(dict(workload="latency-1nfe", width=width, batch=1, seconds=1.0 / one))
    print(json.dumps(dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        device=str(torch.get_default_device()),
        sgemm_gflops=sgemm_peak(args.seconds),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        rows=rows,
    ), indent=1))


if __name__ == "__main__":
    main()
