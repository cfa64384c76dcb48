#!/usr/bin/env bash
# Federated text tasks (issue 7): FedAvg and FedAdam, each without and with
# DP + secure aggregation, on
#   shakespeare: LEAF Shakespeare, transformer-lm, one client per role
#                (10, natural partition), all clients each round
#   sst2:        GLUE SST-2, transformer-cls, 100 clients, Dirichlet 0.5
#   ag-news:     AG News, transformer-cls, 100 clients, Dirichlet 0.5
# with E = 1, B = 32. Prints the best and final accuracy of each run (for
# the language model: next-character accuracy on LEAF's test split). Runs
# whose metrics already cover ROUNDS are skipped (use a fresh OUT to redo).
#
#   cargo build --release -p fedveil-sim
#   FEDVEIL_DATA=../shared/data benches/text_fl.sh shakespeare 20 results/text-shakespeare
#   FEDVEIL_DATA=../shared/data benches/text_fl.sh sst2 30 results/text-sst2
set -euo pipefail
preset=${1:-sst2}
rounds=${2:-20}
out=${3:-results/text-$preset}
sim=${FEDVEIL_SIM:-${CARGO_TARGET_DIR:-target}/release/fedveil-sim}
case "$preset" in
  shakespeare) data=(--dataset leaf-shakespeare --model transformer-lm --partition natural
                     --clients 10 --fraction 1 --lr 0.1) eps=8 ;;
  sst2) data=(--dataset sst2 --model transformer-cls --partition dirichlet:0.5 --clients 100
              --fraction 0.2 --lr 0.05) eps=8 ;;
  ag-news) data=(--dataset ag-news --model transformer-cls --partition dirichlet:0.5 --clients 100
                 --fraction 0.2 --lr 0.05) eps=8 ;;
  *) echo "unknown preset $preset (shakespeare, sst2 or ag-news)" >&2; exit 2 ;;
esac
common=("${data[@]}" --rounds "$rounds" --local-epochs 1 --batch-size 32 --train-limit 0 --seed 1 --quiet)
# name:flags pairs; RUNS="name ..." picks some.
declare -A flags=(
  [fedavg]="--server-optimizer fedavg --secagg false"
  [fedadam]="--server-optimizer fedadam --server-lr 0.01 --secagg false"
  [fedavg-dp]="--server-optimizer fedavg --secagg true --target-epsilon $eps --clip-norm 1.0"
  [fedadam-dp]="--server-optimizer fedadam --server-lr 0.01 --secagg true --target-epsilon $eps --clip-norm 1.0"
)
read -r -a runs <<< "${RUNS:-fedavg fedadam fedavg-dp fedadam-dp}"
for run in "${runs[@]}"; do
  dir="$out/$run"
  [ -s "$dir/metrics.csv" ] && [ "$(tail -n 1 "$dir/metrics.csv" | cut -d, -f1)" = "$rounds" ] && continue
  # shellcheck disable=SC2086
  "$sim" "${common[@]}" ${flags[$run]} --out "$dir"
done
for run in "${runs[@]}"; do
  awk -F, -v run="$run" 'NR > 1 { last = $2; if ($2 > best) best = $2; r = $1 }
    END { printf "%s: rounds %d, best accuracy %.4f, final %.4f\n", run, r, best, last }' "$out/$run/metrics.csv"
done
