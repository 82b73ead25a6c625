#!/usr/bin/env bash
# Does bf16 change what a 2-D teacher and map learn? A checkerboard teacher and an EMD map trained in f32 and in
# bf16 (`--precision bf16`) for each of SEEDS, everything on candle's own ops (`--plain-ops`: bf16 there rounds
# every matrix product's operands to bf16 and sums in f32 on any CPU, which is what the AVX-512 BF16 kernels
# compute up to f32 summation order), both scored in f32 by `flowmap eval` on N samples against held-out points.
# The seeds' spread is the metric's noise the two precisions are compared against. Writes points.md and
# points.json beside this script.
#
#   [SEEDS='0 1 2' TEACHER_STEPS=3000 MAP_STEPS=2000 N=50000] bench/precision/points.sh [target/release/flowmap]
set -euo pipefail
BIN=${1:-target/release/flowmap}
OUT=${OUT:-$(dirname "$0")}
SEEDS=${SEEDS:-0 1 2}
TEACHER_STEPS=${TEACHER_STEPS:-3000}
MAP_STEPS=${MAP_STEPS:-2000}
N=${N:-50000}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
F="$BIN --quiet --plain-ops"
start=$(date +%s)
for seed in $SEEDS; do
  for p in f32 bf16; do
    $F teacher --data checkerboard --steps "$TEACHER_STEPS" --seed "$seed" --precision "$p" --out "$W/t-$p-$seed.safetensors" 2>/dev/null
    $F distill --teacher "$W/t-$p-$seed.safetensors" --method emd --steps "$MAP_STEPS" --seed "$seed" --precision "$p" \
      --out "$W/m-$p-$seed.safetensors" 2>/dev/null
    $F eval --model "$W/t-$p-$seed.safetensors" --nfe 8 --n "$N" --seed 100 --out "$W/et-$p-$seed" >/dev/null
    $F eval --model "$W/m-$p-$seed.safetensors" --nfe 1,2,4 --n "$N" --seed 100 --out "$W/em-$p-$seed" >/dev/null
  done
done
python3 - "$W" "$OUT" "$SEEDS" "$TEACHER_STEPS" "$MAP_STEPS" "$N" "$(($(date +%s) - start))" <<'PY'
import json, statistics, sys, pathlib
w, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
seeds, tsteps, msteps, n, secs = sys.argv[3].split(), sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
flags = next(l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags"))
units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in flags]
cpu += f" ({', '.join(units) or 'no AVX2'})"
def rows(p, s, kind):
    return json.load(open(w / f"e{kind}-{p}-{s}" / "metrics.json"))["rows"]
cols = [("teacher dopri5", "t", lambda r: r["sampler"].startswith("dopri5")),
        ("teacher Euler-8", "t", lambda r: r["sampler"].startswith("euler") and r["nfe"] == 8),
        ("EMD 1 NFE", "m", lambda r: r["nfe"] == 1), ("EMD 2 NFE", "m", lambda r: r["nfe"] == 2),
        ("EMD 4 NFE", "m", lambda r: r["nfe"] == 4)]
table = {}
for name, kind, pick in cols:
    for p in ("f32", "bf16"):
        table[(name, p)] = [next(r["energy"] for r in rows(p, s, kind) if pick(r)) for s in seeds]
md = ["# bf16 against f32 on points", "",
      f"Produced by `bench/precision/points.sh` (SEEDS='{' '.join(seeds)}', TEACHER_STEPS={tsteps}, MAP_STEPS={msteps}, N={n}): "
      f"a checkerboard teacher and an EMD map per seed and precision, every layer on candle's own ops (`--plain-ops`), "
      f"energy distance on {n} samples against held-out points (`flowmap eval`). CPU: {cpu}. Wall time {secs} s.", "",
      "| samples | f32 per seed | bf16 per seed | f32 mean | bf16 mean | bf16 − f32 | spread of f32's seeds (max − min) |",
      "|---|---|---|---:|---:|---:|---:|"]
for name, _, _ in cols:
    a, b = table[(name, "f32")], table[(name, "bf16")]
    md.append(f"| {name} | {', '.join(f'{x:.5f}' for x in a)} | {', '.join(f'{x:.5f}' for x in b)} | "
              f"{statistics.mean(a):.5f} | {statistics.mean(b):.5f} | {statistics.mean(b) - statistics.mean(a):+.5f} | {max(a) - min(a):.5f} |")
(out / "points.md").write_text("\n".join(md) + "\n")
(out / "points.json").write_text(json.dumps({f"{k[0]} {k[1]}": v for k, v in table.items()}, indent=1) + "\n")
print("\n".join(md))
PY
