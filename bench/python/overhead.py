#!/usr/bin/env python3
"""What the Python package costs over the CLI: the same jobs through `flowmap` (the binary) and through
`import flowmap`, alternated, on one machine. Writes overhead.json and overhead.md beside this file.

    scripts/test --python          # builds the package into .venv/
    .venv/bin/python bench/python/overhead.py --bin target/release/flowmap

Rows: a teacher's training (steps per second, from wall time: the CLI process including its start, load and
save, against the Python call), and sampling 1,000,000 points in one step (the CLI writes them to a .npy, the
package returns an array). Each is timed `--repeats` times, CLI and Python alternating; the table gives medians.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import flowmap


def cpu():
    """The CPU model and its vector units, from /proc/cpuinfo."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown", []
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in flags]
    return (model.group(1).strip() if model else "unknown"), units


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/flowmap")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    a = ap.parse_args()
    flowmap.set_threads(a.threads)
    cli = [a.bin, "--quiet", "--threads", str(a.threads)]
    tmp = tempfile.mkdtemp()
    teacher_path = os.path.join(tmp, "t.safetensors")
    map_path = os.path.join(tmp, "m.safetensors")
    # The map to sample from, made once.
    subprocess.run(cli + ["teacher", "--data", "checkerboard", "--steps", "200", "--out", teacher_path], check=True, capture_output=True)
    subprocess.run(cli + ["distill", "--teacher", teacher_path, "--method", "emd", "--steps", "100", "--out", map_path], check=True, capture_output=True)
    fmap = flowmap.load(map_path)

    def cli_train():
        subprocess.run(cli + ["teacher", "--data", "checkerboard", "--steps", str(a.steps), "--batch", str(a.batch),
                              "--out", os.path.join(tmp, "tc.safetensors")], check=True, capture_output=True)

    def py_train():
        flowmap.train_teacher("checkerboard", steps=a.steps, batch=a.batch, progress=False)

    def cli_sample():
        subprocess.run(cli + ["sample", "--model", map_path, "--nfe", "1", "--n", str(a.n), "--out", os.path.join(tmp, "s.npy")],
                       check=True, capture_output=True)

    def py_sample():
        fmap.sample(a.n, nfe=1)

    # Same bits both ways (sampling): the package is the library, not a re-implementation.
    cli_sample()
    import numpy as np

    same = bool(np.array_equal(np.load(os.path.join(tmp, "s.npy")), fmap.sample(a.n, nfe=1)))
    times = {k: [] for k in ("cli_train", "py_train", "cli_sample", "py_sample")}
    for _ in range(a.repeats):
        for name, fn in (("cli_train", cli_train), ("py_train", py_train), ("cli_sample", cli_sample), ("py_sample", py_sample)):
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    model, units = cpu()
    result = dict(
        cpu=model,
        vector_units=units,
        threads=a.threads,
        steps=a.steps,
        batch=a.batch,
        n=a.n,
        repeats=a.repeats,
        seconds=times,
        median_seconds=med,
        train_steps_per_second=dict(cli=a.steps / med["cli_train"], python=a.steps / med["py_train"]),
        train_python_over_cli=med["py_train"] / med["cli_train"],
        sample_python_over_cli=med["py_sample"] / med["cli_sample"],
        sample_same_bits=same,
        command=" ".join([os.path.basename(sys.executable), "bench/python/overhead.py"] + sys.argv[1:]),
    )
    with open(os.path.join(a.out, "overhead.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = f"""# The Python package against the CLI

`{result['command']}` on {model} ({', '.join(units) or 'no AVX'}), {a.threads} threads; medians of {a.repeats}
alternating runs.

| job | CLI | Python | Python / CLI |
|---|---:|---:|---:|
| teacher, checkerboard MLP, {a.steps} steps at batch {a.batch} | {a.steps / med['cli_train']:.1f} steps/s | {a.steps / med['py_train']:.1f} steps/s | {result['train_python_over_cli']:.3f} (time) |
| sample {a.n:,} points, one step | {med['cli_sample']:.3f} s | {med['py_sample']:.3f} s | {result['sample_python_over_cli']:.3f} |

The CLI's times are whole processes (start, load, save or write the `.npy`); the package's are the calls. The
samples are the same bits both ways: {same}.
"""
    with open(os.path.join(a.out, "overhead.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
