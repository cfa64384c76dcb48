#!/usr/bin/env bash
# Simulation at scale (issue 8): MNIST split IID over N clients in one
# fedveil-sim process, every client its own QUIC + mutual TLS connection,
# C = 0.1 (Poisson cohorts of about N/10), SecAgg+ with distributed DP
# (epsilon 8 at delta 1e-5 after the planned rounds), E = 1, B = 10.
#
#   sweep N...:  5 rounds at each client count; prints peak RSS (from
#                /usr/bin/time), setup time (enrolment and connection of
#                every client) and mean time per round.
#   soak N R:    R rounds at N clients, sampling the process's RSS and open
#                file descriptors every 5 s into OUT/soak-N/memory.tsv.
#
#   cargo build --release -p fedveil-sim
#   FEDVEIL_DATA=$PWD/../shared/data benches/scale.sh sweep 100 250 500 1000
#   FEDVEIL_DATA=$PWD/../shared/data benches/scale.sh soak 1000 120
set -euo pipefail
mode=${1:?sweep or soak}
shift
out=${OUT:-results/scale}
sim=${FEDVEIL_SIM:-${CARGO_TARGET_DIR:-target}/release/fedveil-sim}
mkdir -p "$out"
flags() { # clients rounds dir
  echo --dataset mnist --partition iid --clients "$1" --fraction 0.1 --rounds "$2" \
    --local-epochs 1 --batch-size 10 --lr 0.1 --train-limit 0 --seed 1 \
    --secagg true --target-epsilon 8 --delta 1e-5 --clip-norm 1.0 --quiet --out "$3"
}
mean_round_secs() { awk -F, 'NR > 1 { s += $2; n++ } END { printf "%.2f", s / n }' "$1/costs.csv"; }
case "$mode" in
  sweep)
    printf "clients\tpeak_rss_mib\tsetup_s\tmean_round_s\trounds\twall_s\n"
    for n in "$@"; do
      dir="$out/sweep-$n"
      /usr/bin/time -v -o "$dir.time" "$sim" $(flags "$n" 5 "$dir") > "$dir.log" 2>&1
      rss=$(awk -F': ' '/Maximum resident/ { printf "%.0f", $2 / 1024 }' "$dir.time")
      wall=$(awk '/wall time/ { sub("s", "", $3); print $3 }' "$dir.log")
      rounds=$(($(wc -l < "$dir/costs.csv") - 1))
      setup=$(awk -F, -v wall="$wall" 'NR > 1 { s += $2 } END { printf "%.1f", wall - s }' "$dir/costs.csv")
      printf "%s\t%s\t%s\t%s\t%s\t%s\n" "$n" "$rss" "$setup" "$(mean_round_secs "$dir")" "$rounds" "$wall"
    done ;;
  soak)
    n=${1:-1000} rounds=${2:-120}
    dir="$out/soak-$n"
    mkdir -p "$dir"
    "$sim" $(flags "$n" "$rounds" "$dir") > "$dir.log" 2>&1 &
    pid=$!
    printf "secs\trounds_done\trss_mib\topen_fds\n" > "$dir/memory.tsv"
    start=$(date +%s)
    while kill -0 "$pid" 2> /dev/null; do
      # The process may end between two reads: no read may stop the loop.
      rss=$(awk '/VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$pid/status" 2> /dev/null || true)
      fds=$(ls "/proc/$pid/fd" 2> /dev/null | wc -l || true)
      done_rounds=0
      [ -f "$dir/costs.csv" ] && done_rounds=$(($(wc -l < "$dir/costs.csv") - 1))
      [ -n "$rss" ] && printf "%s\t%s\t%s\t%s\n" $(($(date +%s) - start)) "$done_rounds" "$rss" "$fds" >> "$dir/memory.tsv"
      sleep 5
    done
    wait "$pid"
    tail -n 12 "$dir.log"
    echo "mean round: $(mean_round_secs "$dir") s; memory samples in $dir/memory.tsv" ;;
  *) echo "unknown mode $mode (sweep or soak)" >&2; exit 2 ;;
esac
