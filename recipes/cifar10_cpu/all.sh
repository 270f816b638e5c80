#!/usr/bin/env bash
# Every row of the CPU study, in order; each row's wall time is appended to $OUT/wall_times.jsonl.
# About 5 hours on a 2-core CPU. Run again, the training steps resume where they stopped, but
# frozen.sh scores anew (appending to frozen.json) and every step appends another wall time: after
# a stop, run the steps left by hand.
source "$(dirname "$0")/common.sh"
R=recipes/cifar10_cpu
timed() {  # timed NAME COMMAND...: run it, then record its wall time
    local name=$1 begin; shift
    begin=$(date +%s)
    "$@"
    echo "{\"row\": \"$name\", \"seconds\": $(($(date +%s) - begin)), \"command\": \"$*\"}" >> "$OUT/wall_times.jsonl"
}
mkdir -p "$OUT"
"$PYTHON" $R/splits.py --data "$DATA" --out "$OUT/data"
timed pretrain bash $R/pretrain.sh
timed frozen bash $R/frozen.sh
for seed in 0 1; do
    timed "finetune-mae-s$seed" bash $R/finetune.sh mae "$seed"
    timed "finetune-scratch-s$seed" bash $R/finetune.sh scratch "$seed"
done
"$PYTHON" $R/results.py --out "$OUT" --dest $R/results
