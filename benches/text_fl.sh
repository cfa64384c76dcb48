#!/usr/bin/env bash
# Federated text tasks (issue 7): FedAvg and FedAdam, each without and with
# DP + secure aggregation (distributed DP, epsilon 8, delta 1e-5, clip 1), on
#   shakespeare: LEAF Shakespeare, transformer-lm, one client per role (10,
#                natural partition), all clients each round
#   sst2:        GLUE SST-2, transformer-cls, 20 clients (IID), half per round
#   ag-news:     AG News, transformer-cls, 20 clients (IID), half per round
# Clients train with Adam (fresh moments each round), B = 32, at most 50
# steps per round. Prints the best and final accuracy of each run (for the
# language model: next-character accuracy on LEAF's test split). Runs whose
# metrics already cover ROUNDS are skipped (use a fresh OUT to redo).
#
#   cargo build --release -p fedveil-sim
#   FEDVEIL_DATA=$PWD/../shared/data benches/text_fl.sh sst2 15 results/text-sst2
#   FEDVEIL_DATA=$PWD/../shared/data RUNS="fedavg fedadam" benches/text_fl.sh shakespeare 12
set -uo pipefail
preset=${1:-sst2}
rounds=${2:-15}
out=${3:-results/text-$preset}
sim=${FEDVEIL_SIM:-${CARGO_TARGET_DIR:-target}/release/fedveil-sim}
case "$preset" in
  shakespeare) data=(--dataset leaf-shakespeare --model transformer-lm --partition natural
                     --clients 10 --fraction 1 --lr 0.003) ;;
  sst2) data=(--dataset sst2 --model transformer-cls --partition iid --clients 20
              --fraction 0.5 --lr 0.001) ;;
  ag-news) data=(--dataset ag-news --model transformer-cls --partition iid --clients 20
                 --fraction 0.5 --lr 0.001) ;;
  *) echo "unknown preset $preset (shakespeare, sst2 or ag-news)" >&2; exit 2 ;;
esac
common=("${data[@]}" --rounds "$rounds" --local-optimizer adam --max-local-steps 50
        --batch-size 32 --train-limit 0 --seed 1 --quiet)
# name:flags pairs; RUNS="name ..." picks some.
declare -A flags=(
  [fedavg]="--server-optimizer fedavg --secagg false"
  [fedadam]="--server-optimizer fedadam --server-lr 0.01 --secagg false"
  [fedavg-dp]="--server-optimizer fedavg --secagg true --target-epsilon 8 --clip-norm 1.0"
  [fedadam-dp]="--server-optimizer fedadam --server-lr 0.01 --secagg true --target-epsilon 8 --clip-norm 1.0"
)
read -r -a runs <<< "${RUNS:-fedavg fedadam fedavg-dp fedadam-dp}"
for run in "${runs[@]}"; do
  dir="$out/$run"
  [ -s "$dir/metrics.csv" ] && [ "$(tail -n 1 "$dir/metrics.csv" | cut -d, -f1)" = "$rounds" ] && continue
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$sim" "${common[@]}" ${flags[$run]} --out "$dir" || echo "$run: failed" >&2
  echo "$run: $(( $(date +%s) - start )) s" >&2
done
for run in "${runs[@]}"; do
  [ -s "$out/$run/metrics.csv" ] || continue
  awk -F, -v run="$run" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "epsilon") e = i }
    NR > 1 { last = $2; if ($2 > best) best = $2; r = $1; eps = $e }
    END { printf "%s: rounds %d, best accuracy %.4f, final %.4f, epsilon %s\n", run, r, best, last, eps == "" ? "-" : eps }' \
    "$out/$run/metrics.csv"
done
