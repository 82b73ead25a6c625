#!/usr/bin/env bash
# Does training the full jump (1, 0) more often help one-step samples? EMD and LMD distilled from one
# checkerboard teacher at an equal step budget, with a fraction F of each batch's off-diagonal pairs put on
# (t, s) = (1, 0) (`[distill.times] grid_fraction = F, grid_steps = 1`: the one-step sampler's own pair), scored
# by `flowmap eval` at 1 and 2 NFE. Writes full-jump-seed$SEED.md beside this script.
#
#   [SEED=0 STEPS=3000 N=100000 METHODS='emd lmd' FRACTIONS='0 0.1 0.25 0.5'] bench/one-step/full-jump.sh [target/release/flowmap]
set -euo pipefail
BIN=${1:-target/release/flowmap}
OUT=${OUT:-$(dirname "$0")}
STEPS=${STEPS:-3000}
N=${N:-100000}
SEED=${SEED:-0}
METHODS=${METHODS:-emd lmd}
FRACTIONS=${FRACTIONS:-0 0.1 0.25 0.5}
W=$(mktemp -d)
F="$BIN --quiet --threads 2"
$F teacher --data checkerboard --steps 8000 --seed "$SEED" --out "$W/t.safetensors"
$F eval --model "$W/t.safetensors" --nfe 1 --n "$N" --seed "$SEED" --out "$W/e-t" > "$W/e-t.txt"
{
  echo "# The full jump (1, 0) in the training pairs"
  echo
  echo "Produced by \`bench/one-step/full-jump.sh\` (STEPS=$STEPS, N=$N, SEED=$SEED): one checkerboard teacher (8,000 steps), $METHODS"
  echo "distilled for $STEPS steps at batch 1,024 with a fraction F of the off-diagonal pairs on (t, s) = (1, 0)"
  echo "(\`[distill.times] grid_fraction = F, grid_steps = 1\`), energy distance on $N samples against held-out points"
  echo "(\`flowmap eval\`). $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), 2 threads."
  echo
  echo "Teacher:"
  echo
  echo '```'
  cat "$W/e-t.txt"
  echo '```'
  echo
  echo "| method | F | ED, 1 NFE | ED, 2 NFE |"
  echo "|---|---:|---:|---:|"
} > "$OUT/full-jump-seed$SEED.md"
for m in $METHODS; do
  for f in $FRACTIONS; do
    printf '[distill.times]\ngrid_fraction = %s\ngrid_steps = 1\n' "$f" > "$W/c.toml"
    $F distill --teacher "$W/t.safetensors" --method $m --steps "$STEPS" --seed "$SEED" --config "$W/c.toml" --out "$W/$m-$f.safetensors"
    $F eval --model "$W/$m-$f.safetensors" --nfe 1,2 --n "$N" --seed "$SEED" --out "$W/e-$m-$f" > /dev/null
    python3 - "$W/e-$m-$f/metrics.json" "$m" "$f" >> "$OUT/full-jump-seed$SEED.md" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
e = {r["nfe"]: r["energy"] for r in rows}
print(f"| {sys.argv[2]} | {sys.argv[3]} | {e[1]:.6f} | {e[2]:.6f} |")
PY
  done
done
cat "$OUT/full-jump-seed$SEED.md"
