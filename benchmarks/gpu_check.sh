#!/usr/bin/env bash
# The first-contact check of a GPU (issue 18), in one command of at most 8 minutes on a bare H100 or H200:
# the environment (versions, clocks, matmul peak, copy rate, GPU JPEG decoding), the CUDA tests,
# what the CIFAR-10 study needs (issue 19: its steps, the memory loader), the training step (official
# code against ours), the loaders, and end to end. Every part runs under its own timeout, so one
# failure never stops the rest; the summary (gpu_check.json in the issue's format, gpu_check.md) is
# rewritten after each part in $OUT, with gpu_check.log.
#
#   bash benchmarks/gpu_check.sh          # on the GPU; benchmarks/README.md gives the device run
#   bash benchmarks/gpu_check.sh --cpu    # every part at toy sizes on a CPU, in under 2 minutes
#
# Inputs, all git-ignored and carried to the device: benchmarks/official_mae
# (bash benchmarks/fetch_official.sh PATH_TO_MAE_CLONE) and benchmarks/jpeg_subset
# (python -m benchmarks.make_jpeg_subset); without them the parts that need them record why. And
# wheels/ (bash benchmarks/fetch_wheels.sh): timm as tested here, over the machine's own.
# Environment: OUT (default gpu_check_out), PYTHON (default python3), GPU_CHECK_PARTS (a subset
# of "env tests cifar step loader e2e", in that order), GPU_CHECK_SECONDS (the whole budget),
# GPU_CHECK_FAIL=<part> (that part crashes at its start: a test of the summary's errors).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODE_FLAG=()
if [[ ${1:-} == --cpu ]]; then
    MODE_FLAG=(--cpu)
    declare -A BUDGET=([env]=15 [tests]=20 [cifar]=20 [step]=25 [loader]=15 [e2e]=15)
    TOTAL=${GPU_CHECK_SECONDS:-120}
elif [[ $# -gt 0 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh [--cpu]" >&2
    exit 2
else
    # Seconds per part (the total less RESERVE), sized for an H200 and kept for an H100, the device tool's first
    # kind: compilation (inductor, on the 16 CPU cores of either) is most of cifar, step and e2e, the CPU workers
    # most of loader and e2e; on the GPU, the bf16 matrix products run at the same rate on both (790 and 798
    # TFLOP/s measured), and only the work bound by memory traffic (norms, AdamW, the CIFAR model) is slower on
    # an H100 (3.0 TB/s against 4.3): a few seconds of step's and cifar's timed steps. The H100's largest batch is
    # about half the H200's, so that row is quicker. What a part leaves of its budget goes to the next ones
    # (mostly to step).
    declare -A BUDGET=([env]=25 [tests]=110 [cifar]=75 [step]=150 [loader]=40 [e2e]=70)
    TOTAL=${GPU_CHECK_SECONDS:-480}
fi
OUT=${OUT:-gpu_check_out}
PYTHON=${PYTHON:-python3}
PARTS=${GPU_CHECK_PARTS:-env tests cifar step loader e2e}
for part in $PARTS; do
    [[ -v "BUDGET[$part]" ]] || { echo "error: GPU_CHECK_PARTS: no part $part; the parts: ${!BUDGET[*]}" >&2; exit 2; }
done
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log # every part's output as it comes: kept if the whole command is stopped
: >"$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
source benchmarks/use_wheels.sh
use_wheels "$WORK/site"
export PYTHONUNBUFFERED=1
RESERVE=10 # seconds kept for the last part's kill (timeout -k 5) and the last summary

later_budgets() { # the budgets of the parts after $1: kept for them whatever the parts before take
    local sum=0 after=0 p
    for p in $PARTS; do
        ((after)) && sum=$((sum + BUDGET[$p]))
        [[ $p == "$1" ]] && after=1
    done
    echo "$sum"
}

start=$SECONDS
for part in $PARTS; do
    # A part may use what the parts before it left of their budgets, never what the later ones have.
    limit=$((TOTAL - (SECONDS - start) - RESERVE - $(later_budgets "$part")))
    echo "===== $part" >>"$LOG"
    if ((limit < 5)); then
        echo skipped >"$WORK/$part.rc"
    else
        began=$SECONDS
        GPU_CHECK_PART_DEADLINE=$(($(date +%s) + limit)) timeout -k 5 "$limit" \
            "$PYTHON" -m "benchmarks.gpu_check_$part" --work "$WORK" "${MODE_FLAG[@]}" >>"$LOG" 2>&1
        echo $? >"$WORK/$part.rc"
        echo "$part: status $(cat "$WORK/$part.rc"), $((SECONDS - began)) s of $limit" | tee -a "$LOG"
    fi
    "$PYTHON" -m benchmarks.gpu_check_summary --work "$WORK" --out "$OUT"
done
"$PYTHON" -m benchmarks.gpu_check_summary --work "$WORK" --out "$OUT" --print
echo "wrote $OUT/gpu_check.json, $OUT/gpu_check.md and $OUT/gpu_check.log in $((SECONDS - start)) s"
