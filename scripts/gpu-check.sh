#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, times the CNN and
# transformer training steps on cuda, wgpu and cpu, runs a 10-client
# simulation on the GPU, and writes every figure to one folder.
#
#   scripts/gpu-check.sh [OUT]          builds for CUDA + wgpu first (release)
#   FEDVEIL_BIN=DIR scripts/gpu-check.sh [OUT]
#                                       uses fedveil-bench and fedveil-sim from
#                                       DIR, built elsewhere with the same
#                                       command (for a GPU machine that cannot
#                                       reach crates.io or PyPI)
#
# OUT defaults to $OUT or results/gpu-check; it gets gpu.txt (the GPU and
# driver), steps.jsonl (one line per device, model and batch), sim/ (the
# simulation's results) and summary.md (a table for docs/BENCHMARKS.md).
# Needs MNIST under $FEDVEIL_DATA (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results/gpu-check}}
mkdir -p "$out"
export FEDVEIL_DATA=${FEDVEIL_DATA:-$(cd ../shared/data 2> /dev/null && pwd || echo data)}
export FEDVEIL_OFFLINE=1
XDG_RUNTIME_DIR=$(mktemp -d)
export XDG_RUNTIME_DIR

if [ -n "${FEDVEIL_BIN:-}" ]; then
  bin=$FEDVEIL_BIN
else
  scripts/setup-cuda.sh
  start=$(date +%s)
  cargo build --release --locked -p fedveil-sim --bins --features fedveil-sim/cuda
  echo "build: $(( $(date +%s) - start )) s" | tee "$out/build.txt"
  bin=${CARGO_TARGET_DIR:-target}/release
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"; \
  nproc; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

: > "$out/steps.jsonl"
for device in cuda wgpu cpu; do
  for model in cnn transformer-cls; do
    for batch in 64 10; do
      line=$(timeout 120 "$bin/fedveil-bench" train-step --device "$device" --model "$model" \
        --batch "$batch" --steps 50 --warmup 10 2> "$out/step-$device-$model-$batch.err") ||
        line="{\"bench\":\"train-step\",\"device\":\"$device\",\"model\":\"$model\",\"batch\":$batch,\"failed\":true}"
      echo "$line" | tee -a "$out/steps.jsonl"
    done
  done
done

sim_start=$(date +%s)
timeout 300 "$bin/fedveil-sim" --quiet --device cuda --clients 10 --fraction 1 --rounds 5 \
  --local-epochs 1 --out "$out/sim" > "$out/sim.log" 2>&1 || echo "simulation failed: see sim.log"
echo "simulation: $(( $(date +%s) - sim_start )) s" | tee -a "$out/sim.log"

{
  echo "| device | model | batch | ms/step |"
  echo "|---|---|---|---|"
  while read -r line; do
    field() { grep -oE "\"$1\":\"?[^,\"}]+" <<< "$line" | head -n 1 | sed -E 's/^"[^"]+":"?//'; }
    echo "| $(field device) | $(field model) | $(field batch) | $(field ms_per_step || true) |"
  done < "$out/steps.jsonl"
  echo
  grep -E "rounds|round time|accuracy" "$out/sim.log" || true
} > "$out/summary.md"
cat "$out/summary.md"
