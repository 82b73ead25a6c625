#!/usr/bin/env bash
# The recommended recipe for an hour on MNIST: `flowmap distill` without `--method` from the shipped teacher, for
# the 15,764 steps that `--minutes 60` planned on a quiet 2-core AMD EPYC (228 ms a step; `--minutes 60` plans
# what an hour buys on the machine at hand), then scored by `flowmap eval` (2,000 samples, the project's
# classifier) at 1, 2 and 4 NFE on three seeds beside the teacher's dopri5, and the two-step grid t_1 = 0.5^ρ
# swept on seed 1 (ρ chosen there, then read on seeds 0 and 2). Writes mnist-hour/ beside this script.
#
#   [STEPS=15764 SEEDS='0 1 2'] bench/one-step/mnist-hour.sh [target/release/flowmap]
set -euo pipefail
BIN=${1:-target/release/flowmap}
OUT=${OUT:-$(dirname "$0")/mnist-hour}
STEPS=${STEPS:-15764}
SEEDS=${SEEDS:-0 1 2}
T=$(dirname "$0")/../../crates/flowmap-cli/assets/mnist-teacher.safetensors
F="$BIN --quiet --threads 2"
mkdir -p "$OUT/two-step-grid"
W=$(mktemp -d)
$F distill --teacher "$T" --steps "$STEPS" --out "$W/cm.safetensors" 2> "$OUT/distill.log"
for s in $SEEDS; do
  $F eval --model "$W/cm.safetensors" --nfe 1,2,4 --n 2000 --seed "$s" --out "$OUT/cm-seed$s" > /dev/null
  $F eval --model "$T" --nfe 8 --n 2000 --seed "$s" --out "$OUT/teacher-seed$s" > /dev/null
  $F eval --model "$W/cm.safetensors" --nfe 2 --grid-power 0.5 --n 2000 --seed "$s" --out "$W/r" > /dev/null
  cp "$W/r/metrics.md" "$OUT/two-step-grid/rho0.5-seed$s.md"
done
for r in 0.3 0.4 0.75 1 1.5 2 3; do
  $F eval --model "$W/cm.safetensors" --nfe 2 --grid-power "$r" --n 2000 --seed 1 --out "$W/r" > /dev/null
  cp "$W/r/metrics.md" "$OUT/two-step-grid/rho$r-seed1.md"
done
rm -rf "$W"
