#!/usr/bin/env bash
# Data-parallel scaling on this machine: 2 ranks x 1 thread (mpirun, the `mpi` build) against 1 process x
# 2 threads, the same global batch and steps; alternating rounds, each side's best steps/s kept.
# Usage: bench/distributed/scaling.sh [ROUNDS]   (writes bench/distributed/scaling.{json,md})
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
mpi_bin=target/mpi/release/flowmap
plain_bin=target/release/flowmap
[[ -x $mpi_bin ]] || CARGO_TARGET_DIR=target/mpi cargo build --release --locked -q -p flowmap-cli --features mpi
[[ -x $plain_bin ]] || cargo build --release --locked -q -p flowmap-cli
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(grep -oE 'avx512f|avx512_bf16|amx_bf16|avx2' /proc/cpuinfo | sort -u | paste -sd ' ')"
# name, flags
cases=(
  "mlp-teacher batch 1024|teacher --data checkerboard --steps 1500 --batch 1024"
  "mlp-meanflow batch 1024|train --data checkerboard --method meanflow --steps 800 --batch 1024"
  "unet-teacher batch 64|teacher --data mnist --steps 20 --batch 64"
  "unet-cm batch 64|distill --teacher crates/flowmap-cli/assets/mnist-teacher.safetensors --method cm --steps 12 --batch 64"
)
rate() { # the steps/s a run printed: "N steps in S s"
  sed -nE 's/.*: ([0-9]+) steps in ([0-9.]+)s.*/\1 \2/p' | awk '{printf "%.3f", $1 / $2}'
}
json="["
md="# Data-parallel scaling on one machine\n\nProduced by \`bench/distributed/scaling.sh $rounds\`. CPU: $cpu. Steps/s of the training loop (its own clock), best of $rounds alternating rounds.\n\n| run | 1 process × 2 threads | 2 ranks × 1 thread | ratio |\n|---|---:|---:|---:|\n"
for c in "${cases[@]}"; do
  name=${c%%|*}; read -r -a flags <<<"${c#*|}"
  best1=0; best2=0
  for _ in $(seq "$rounds"); do
    r1=$("$plain_bin" --quiet --threads 2 "${flags[@]}" --out "$work/a.safetensors" 2>&1 | rate)
    r2=$(mpirun --allow-run-as-root --oversubscribe -np 2 "$mpi_bin" --quiet --threads 1 "${flags[@]}" --out "$work/b.safetensors" 2>&1 | rate)
    best1=$(echo "$best1 $r1" | awk '{print ($2 > $1) ? $2 : $1}')
    best2=$(echo "$best2 $r2" | awk '{print ($2 > $1) ? $2 : $1}')
  done
  ratio=$(echo "$best2 $best1" | awk '{printf "%.2f", $1 / $2}')
  echo "$name: 1x2 $best1 steps/s, 2x1 $best2 steps/s, ratio $ratio"
  json+="{\"run\":\"$name\",\"one_process_two_threads\":$best1,\"two_ranks_one_thread\":$best2,\"ratio\":$ratio},"
  md+="| $name | $best1 | $best2 | $ratio |\n"
done
echo "${json%,}]" | python3 -m json.tool > bench/distributed/scaling.json
printf "%b" "$md" > bench/distributed/scaling.md
