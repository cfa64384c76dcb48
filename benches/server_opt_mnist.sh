#!/usr/bin/env bash
# Server optimizers on non-IID MNIST (issue 5): 100 clients, Dirichlet
# alpha 0.1 label split, C = 0.1, E = 1, B = 10, client lr 0.05; FedAvg
# (server lr 1) against FedAdam and FedYogi at server lr SERVER_LR.
#
#   cargo build --release -p fedveil-sim
#   FEDVEIL_DATA=../shared/data benches/server_opt_mnist.sh [ROUNDS] [OUT] [SERVER_LR]
set -euo pipefail
rounds=${1:-25}
out=${2:-results/server-opt}
slr=${3:-0.01}
sim=${FEDVEIL_SIM:-${CARGO_TARGET_DIR:-target}/release/fedveil-sim}
common=(--dataset mnist --partition dirichlet:0.1 --clients 100 --fraction 0.1 --rounds "$rounds"
  --local-epochs 1 --batch-size 10 --lr 0.05 --train-limit 0 --seed 1 --secagg false --quiet)
"$sim" "${common[@]}" --server-optimizer fedavg --out "$out/fedavg"
for opt in fedadam fedyogi; do
  "$sim" "${common[@]}" --server-optimizer "$opt" --server-lr "$slr" --out "$out/$opt-$slr"
done
for run in fedavg "fedadam-$slr" "fedyogi-$slr"; do
  awk -F, -v run="$run" 'NR > 1 { if (!hit && $2 >= 0.9) { hit = $1 } last = $2 }
    END { print run ": first round >= 0.90: " (hit ? hit : "none") ", final accuracy " last }' "$out/$run/metrics.csv"
done
