#!/usr/bin/env bash
# Server optimizers (issue 5): FedAvg, FedAdam and FedYogi over a grid of
# server learning rates, on
#   mnist:   100 clients, Dirichlet alpha 0.1 label split of the 60k set
#   femnist: LEAF FEMNIST, one client per writer (105, natural partition)
# with C = 0.1, E = 1, B = 10, client lr 0.05. Prints, per run, the first
# round reaching each target accuracy. Runs whose metrics already cover
# ROUNDS are skipped (use a fresh OUT to redo them).
#
#   cargo build --release -p fedveil-sim
#   FEDVEIL_DATA=../shared/data benches/server_opt.sh mnist 25 results/server-opt
#   FEDVEIL_DATA=../shared/data benches/server_opt.sh femnist 50 results/server-opt-femnist
set -euo pipefail
preset=${1:-mnist}
rounds=${2:-25}
out=${3:-results/server-opt}
sim=${FEDVEIL_SIM:-${CARGO_TARGET_DIR:-target}/release/fedveil-sim}
case "$preset" in
  mnist) data=(--dataset mnist --partition dirichlet:0.1 --clients 100) targets="0.90 0.95" ;;
  femnist) data=(--dataset femnist --partition natural --clients 105) targets="0.40 0.50" ;;
  *) echo "unknown preset $preset (mnist or femnist)" >&2; exit 2 ;;
esac
common=("${data[@]}" --fraction 0.1 --rounds "$rounds" --local-epochs 1 --batch-size 10 --lr 0.05
  --train-limit 0 --seed 1 --secagg false --quiet)
# Optimizer:server-lr pairs; RUNS="..." overrides.
read -r -a runs <<< "${RUNS:-fedavg:1 fedavg:2 fedadam:0.003 fedadam:0.01 fedadam:0.03 fedyogi:0.003 fedyogi:0.01 fedyogi:0.03}"
for run in "${runs[@]}"; do
  opt=${run%%:*} slr=${run##*:}
  dir="$out/$opt-$slr"
  [ -s "$dir/metrics.csv" ] && [ "$(tail -n 1 "$dir/metrics.csv" | cut -d, -f1)" = "$rounds" ] && continue
  "$sim" "${common[@]}" --server-optimizer "$opt" --server-lr "$slr" --out "$dir"
done
for run in "${runs[@]}"; do
  opt=${run%%:*} slr=${run##*:}
  awk -F, -v run="$opt-$slr" -v targets="$targets" '
    BEGIN { n = split(targets, t, " ") }
    NR > 1 { for (i = 1; i <= n; i++) if (!hit[i] && $2 >= t[i]) hit[i] = $1; last = $2; if ($2 > best) best = $2 }
    END { line = run ":"; for (i = 1; i <= n; i++) line = line " first >= " t[i] ": " (hit[i] ? hit[i] : "none") ";";
          print line " best " best ", final " last }' "$out/$opt-$slr/metrics.csv"
done
