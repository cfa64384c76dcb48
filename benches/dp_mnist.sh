#!/usr/bin/env bash
# Accuracy vs epsilon on MNIST with SecAgg+ and distributed DP (issue 4):
# 1000 clients built from the 60k training set (60 each, IID), Poisson
# cohorts of expected size 100 (q = 0.1), delta 1e-5, epsilon in {1, 3, 8}
# reached after ROUNDS rounds, and the same run without DP; then epsilon 3
# and 1 with adaptive clipping.
#
#   cargo build --release -p fedveil-sim
#   FEDVEIL_DATA=../shared/data benches/dp_mnist.sh [ROUNDS] [OUT]
set -euo pipefail
rounds=${1:-30}
out=${2:-results/dp-mnist}
sim=${FEDVEIL_SIM:-${CARGO_TARGET_DIR:-target}/release/fedveil-sim}
common=(--dataset mnist --partition iid --clients 1000 --fraction 0.1 --rounds "$rounds"
  --local-epochs 1 --batch-size 10 --lr 0.1 --train-limit 0 --seed 1 --quiet)
"$sim" "${common[@]}" --out "$out/no-dp"
for eps in 8 3 1; do
  "$sim" "${common[@]}" --target-epsilon "$eps" --delta 1e-5 --clip-norm 1.0 --out "$out/eps-$eps"
done
# Adaptive clipping (median norm), same budgets.
for eps in 3 1; do
  "$sim" "${common[@]}" --target-epsilon "$eps" --delta 1e-5 --clip-norm 1.0 --adaptive-clip \
    --out "$out/eps-$eps-adaptive"
done
for run in no-dp eps-8 eps-3 eps-1 eps-3-adaptive eps-1-adaptive; do
  tail -n 1 "$out/$run/metrics.csv" | awk -F, -v run="$run" '{print run ": round " $1 ", accuracy " $2 ", epsilon " $13}'
done
