#!/usr/bin/env python3
"""PyTorch peer of `flowmap bench speed` for image networks: the U-Net twin (`flowmap_unet.py`) on
1 x 28 x 28 images, class-conditional (10 classes, labels dropped with probability 0.1), written the way a
PyTorch user writes it.

Workloads (names as in flowmap's report):
- `unet-teacher`: one conditional flow-matching step (x_t = (1 - t) x0 + t x1, target x1 - x0, MSE, AdamW,
  EMA update);
- `unet-emd`: one discrete Eulerian map-distillation step from a frozen teacher (a quarter of the batch on
  the diagonal s = t, regressed on the teacher's velocity; the rest on sg[eps v + (1 - eps) F(x_t', t', s)],
  weight 1/eps^2; AdamW, EMA);
- `unet-meanflow`: one MeanFlow step from data: `F, dF/dt = torch.func.jvp(F_theta, (x, t, s), (v, 1, 0))`
  with v = x1 - x0 (py-meanflow's form: the primal output carries the gradient), target
  sg(v - (t - s) dF/dt), MSE, AdamW, EMA;
- `unet-sample-1nfe`: f(x1, 1, 0) = x1 - F(x1, 1, 0) under `torch.inference_mode()`, images/s;
- `unet-latency-1nfe`: the same for one image, seconds;
- `unet-jvp`: `torch.func.jvp` of F along (v, 1, 0) at batch 128 over a forward pass, both without grad.

Every training row also reports its memory: the resident set's peak growth over one step, in a fresh
process whose glibc returns freed blocks to the OS (`memory_of`; Linux).

Usage: python3 bench/peer/torch_unet_peer.py --threads 2 --channels 16,32 --batches 32,128,256
Prints one JSON document on stdout. Dependencies: `pip install torch safetensors`.
"""

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flowmap_unet import Unet, config  # noqa: E402 (bench/peer/flowmap_unet.py: the package's twins)
import torch_peer  # noqa: E402
from torch_peer import autocast, device_type, ema_update, generator, use_device  # noqa: E402
from torch_peer import timed as timed_with_count  # noqa: E402

CLASSES = 10
LABEL_DROPOUT = 0.1


def status_mb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None


START = [None]


def reset_peak():
    """Resets the peak resident set to the current one (Linux) and remembers it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    START[0] = status_mb("VmRSS:")


def peak_mb():
    """The resident set's growth since `reset_peak`, MB (None on a GPU, whose memory it does not see)."""
    if device_type() != "cpu":
        return None
    peak = status_mb("VmHWM:")
    return None if peak is None or START[0] is None else peak - START[0]


def timed(fn, min_seconds):
    """Calls per second of `fn` (two warm-up calls, then at least three and `min_seconds`)."""
    return timed_with_count(fn, min_seconds, warmup=2)[0]


def nets(channels, seed, flow_map):
    torch.manual_seed(seed)
    cfg = config([1, 28, 28], channels=channels, num_classes=CLASSES)
    model = autocast(Unet(cfg, flow_map=flow_map).zero_init_())
    ema = Unet(cfg, flow_map=flow_map)
    ema.load_state_dict(model.state_dict())
    return cfg, model, ema


class Batches:
    """Images in [-1, 1] and labels (the content does not matter for speed)."""

    def __init__(self, seed):
        self.gen = generator(seed)
        self.data = torch.rand(4096, 1, 28, 28, generator=self.gen) * 2 - 1
        self.labels = torch.randint(0, CLASSES, (4096,), generator=self.gen)

    def draw(self, b):
        i = torch.randint(0, self.data.shape[0], (b,), generator=self.gen)
        labels = self.labels[i].clone()
        labels[torch.rand(b, generator=self.gen) < LABEL_DROPOUT] = CLASSES
        x0 = self.data[i]
        x1 = torch.randn(x0.shape, generator=self.gen)
        return x0, x1, labels


def col(t):
    return t[:, :, None, None]


def step_teacher(args, ch, b, data):
    _, model, ema = nets(ch, args.seed, False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def step():
        x0, x1, labels = data.draw(b)
        t = torch.rand(b, 1, generator=data.gen)
        xt = (1 - col(t)) * x0 + col(t) * x1
        loss = ((model(xt, t, labels=labels) - (x1 - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, 0.999)

    return step


def times(b, gen):
    a = torch.rand(b, 1, generator=gen)
    c = torch.rand(b, 1, generator=gen)
    return torch.maximum(a, c), torch.minimum(a, c)


def step_emd(args, ch, b, data):
    _, teacher, _ = nets(ch, args.seed, False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    _, model, ema = nets(ch, args.seed + 1, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    eps, n_diag = 0.1, round(b * 0.25)

    def step():
        x0, x1, labels = data.draw(b)
        t, s = times(b, data.gen)
        t = t.clamp_min(1e-3)
        s = torch.minimum(s, t - 1e-3).clamp_min(0.0)
        s[:n_diag] = t[:n_diag]
        xt = (1 - col(t)) * x0 + col(t) * x1
        with torch.no_grad():
            v = teacher(xt, t, labels=labels)
            to, so, xo, lo = t[n_diag:], s[n_diag:], xt[n_diag:], labels[n_diag:]
            h = eps * (so - to)
            target = eps * v[n_diag:] + (1 - eps) * model(xo + col(h) * v[n_diag:], to + h, to + h - so, lo)
        f = model(xt, t, t - s, labels)
        loss_d = ((f[:n_diag] - v[:n_diag]) ** 2).mean()
        loss_o = ((f[n_diag:] - target) ** 2).mean() / eps**2
        loss = loss_d * (n_diag / b) + loss_o * ((b - n_diag) / b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, 0.999)

    return step


def step_meanflow(args, ch, b, data):
    _, model, ema = nets(ch, args.seed, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def step():
        x0, x1, labels = data.draw(b)
        t, s = times(b, data.gen)
        xt = (1 - col(t)) * x0 + col(t) * x1
        v = x1 - x0
        fn = lambda x, t_, s_: model(x, t_, t_ - s_, labels)  # noqa: E731
        f, df_dt = torch.func.jvp(fn, (xt, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
        target = (v - col(t - s) * df_dt).detach()
        loss = ((f - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, 0.999)

    return step


def one_step_sampler(ch, b, seed):
    _, model, _ = nets(ch, seed, True)
    gen = generator(seed)
    x = torch.randn(b, 1, 28, 28, generator=gen)
    one, zero = torch.ones(b, 1), torch.zeros(b, 1)
    labels = torch.arange(b) % CLASSES

    @torch.inference_mode()
    def sample():
        return x - model(x, one, one - zero, labels)

    return sample


def bench_jvp(args, ch, b):
    _, model, _ = nets(ch, args.seed, True)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = generator(args.seed)
    x = torch.randn(b, 1, 28, 28, generator=gen)
    v = torch.randn(b, 1, 28, 28, generator=gen)
    t, s = times(b, gen)
    labels = torch.arange(b) % CLASSES
    fn = lambda x_, t_, s_: model(x_, t_, t_ - s_, labels)  # noqa: E731

    def forward():
        with torch.no_grad():
            fn(x, t, s)

    def jvp():
        with torch.no_grad():
            torch.func.jvp(fn, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))

    return timed(forward, args.seconds), timed(jvp, args.seconds)


STEPS = {"unet-teacher": step_teacher, "unet-emd": step_emd, "unet-meanflow": step_meanflow}


def memory_of(args, name, ch, b):
    """The resident-set growth of one training step of the row, in a fresh process whose glibc returns
    every block of 64 KiB or more to the OS when it is freed (so the resident set follows the live heap):
    in this process, memory freed by earlier rows would be reused and not counted."""
    if device_type() != "cpu":
        return None  # the resident set says nothing of a GPU's memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
                          "--seed", str(args.seed), "--autocast", args.autocast,
                          "--memory-row", f"{name},{ch},{b}"],
                         env=env, capture_output=True, text=True)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def memory_row(args, spec):
    """`--memory-row NAME,CH,B`: one warm-up step, then the peak growth over two more, MB."""
    name, ch, b = spec.split(",")
    step = STEPS[name](args, int(ch), int(b), Batches(args.seed))
    step()
    reset_peak()
    step()
    step()
    print(peak_mb())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--memory-row", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels", default="16,32")
    p.add_argument("--batches", default="32,128,256")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autocast", choices=["none", "bf16"], default="none")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args()
    torch_peer.AUTOCAST[0] = args.autocast == "bf16"
    use_device(args.device)
    torch.set_num_threads(args.threads)
    if args.memory_row:
        return memory_row(args, args.memory_row)
    channels = [int(c) for c in args.channels.split(",") if c]
    batches = [int(b) for b in args.batches.split(",") if b]
    data = Batches(args.seed)
    rows = []

    def row(workload, ch, b, per_second=None, seconds=None, ratio=None, mb=None):
        rows.append(dict(workload=workload, width=ch, batch=b, per_second=per_second, seconds=seconds,
                         ratio=ratio, peak_rss_mb=mb))

    failures = []

    def attempt(workload, ch, b, fn):
        """`fn()`, or None with the error kept for the report (a row PyTorch cannot run)."""
        try:
            return fn()
        except RuntimeError as e:
            failures.append(f"{workload} {ch} {b}: {type(e).__name__}: {str(e).splitlines()[0]}")
            return None

    for ch in channels:
        for b in batches:
            for name in STEPS:
                r = attempt(name, ch, b, lambda: timed(STEPS[name](args, ch, b, data), args.seconds))
                if r is not None:
                    row(name, ch, b, per_second=r, mb=memory_of(args, name, ch, b))
            reset_peak()
            r = timed(one_step_sampler(ch, b, args.seed), args.seconds)
            row("unet-sample-1nfe", ch, b, per_second=r * b, mb=peak_mb())
        reset_peak()
        r = timed(one_step_sampler(ch, 1, args.seed), args.seconds)
        row("unet-latency-1nfe", ch, 1, seconds=1.0 / r, mb=peak_mb())
        fj = attempt("unet-jvp", ch, 128, lambda: bench_jvp(args, ch, 128))
        if fj is not None:
            row("unet-jvp", ch, 128, ratio=fj[0] / fj[1])
    print(json.dumps(dict(torch=torch.__version__, threads=args.threads, device=args.device, rows=rows,
                          failures=failures)))


if __name__ == "__main__":
    main()
