# Shared settings of the GPU study of CIFAR-10 (README.md beside this file: the plan, its arithmetic
# and the device commands). Each script sources this file; override any setting from the
# environment, e.g. LOADER=fast PRETRAIN_EPOCHS=2 bash recipes/cifar10_gpu/pretrain.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
R=recipes/cifar10_gpu
PYTHON=${PYTHON:-python3}
ARCHIVE=${ARCHIVE:-$R/data/cifar10.tgz}                      # data.py pack writes it; carried to the device
ENCODER=${ENCODER:-$R/encoder/mae-encoder-bf16.safetensors}  # pretrain.sh leaves it here and in $OUT
WORK=${WORK:-out/cifar10_gpu}   # unpacked images, splits, runs and checkpoints (git-ignored, never back)
OUT=${OUT:-$WORK/back}          # what comes back: the device tool returns its $OUT (8 files at most)
DATA=$WORK/cifar10              # train/ (50,000) and test/ (10,000)
SPLITS=$WORK/splits             # recipes/cifar10_cpu/splits.py: heldout/, labels10-val/, labels10-test/
LOADER=${LOADER:-memory}        # pre-training's --loader: the data set decoded once, on the device
MAE_MODEL=${MAE_MODEL:-mae_vit_tiny_patch2}
INPUT_SIZE=${INPUT_SIZE:-32}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-160}
FT_EPOCHS=${FT_EPOCHS:-30}      # fine-tuning on all labels (and on heldout/ to choose)
FT10_EPOCHS=${FT10_EPOCHS:-100} # fine-tuning on 10% of the labels: as many steps as 10 epochs of all
LIMIT=${LIMIT:-480}             # seconds any one training command may run
# The device ends a call after 600 s: every run is stopped DEADLINE seconds after the command began
# (the runs of `together` share its start), and killed GRACE seconds later if it ignores the stop.
export BEGIN_MS=${BEGIN_MS:-$(($(date +%s%N) / 1000000))}
DEADLINE=${DEADLINE:-560}
GRACE=${GRACE:-15}
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"  # EXTRA: flags appended to every command (last wins)
# The GPU in every line of times.jsonl, and so in every row of results.py: the device tool gives an H100 or an
# H200 (the same matmul rate, 30% less memory bandwidth on the H100), and seconds compare only within one kind.
GPU_NAME=${GPU_NAME:-$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)}
# What the device's loaders run under, never read there yet: workers pass batches as files in /dev/shm, one
# descriptor each until taken (a limit of 1024 broke --loader memory's decode before 4ad004f). In the reply's output.
SHM_FREE=$(df -h --output=avail /dev/shm 2>/dev/null | tail -n 1 | tr -d ' ' || true)
# nproc alone prints OMP_NUM_THREADS where that is set: the cores are what this process may run on.
echo "machine: $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) cores, GPU ${GPU_NAME:-none}, open files $(ulimit -n), /dev/shm ${SHM_FREE:-none} free"
mkdir -p "$WORK" "$OUT"
source benchmarks/use_wheels.sh
use_wheels "$(cd "$WORK" && pwd)/site"  # wheels/, where carried: timm as tested here, over the machine's own

ms_left() {  # milliseconds before the deadline (negative once it passed)
    echo $((DEADLINE * 1000 - ($(date +%s%N) / 1000000 - BEGIN_MS)))
}

seconds() {  # seconds MS: as a decimal number of seconds
    printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000))
}

timed() {  # timed NAME SHARING COMMAND...: run it under the time limit; its wall time goes to $OUT/times.jsonl
    local name=$1 sharing=$2 begin status=0 limit
    shift 2
    limit=$(ms_left)
    ((limit > LIMIT * 1000)) && limit=$((LIMIT * 1000))
    begin=$(date +%s%N)
    if ((limit > 0)); then
        timeout -k "$GRACE" "$(seconds "$limit")" "$@" || status=$?
    else
        echo "$name: not started, the command's $DEADLINE s are spent" >&2
        status=124
    fi
    printf '{"run": "%s", "seconds": %s, "sharing": %d, "status": %d, "gpu": "%s"}\n' "$name" \
        "$(seconds $((($(date +%s%N) - begin) / 1000000)))" "$sharing" "$status" "${GPU_NAME:-none}" >>"$OUT/times.jsonl"
    return "$status"
}

require_encoder() {  # before the unpack: a missing encoder, or another model's, fails every MAE run
    "$PYTHON" $R/check_encoder.py "$ENCODER" "$MAE_MODEL"
}

unpack() {  # the images and the splits, once per machine
    "$PYTHON" $R/data.py unpack --archive "$ARCHIVE" --dest "$DATA" --splits "$SPLITS" --per_class "${PER_CLASS:-500}"
}

together() {  # together ARGS... ARGS...: finetune.sh runs at once on one GPU, each "INIT SEED SPLIT"; wait for all
    local pids=() failed=0 run
    for run in "$@"; do
        # shellcheck disable=SC2086  # each run is three words
        SHARING=$# bash $R/finetune.sh $run &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    return $failed
}

strip_epochs() {  # strip_epochs EPOCHS: the reconstruction strip's epochs for a run of EPOCHS, distinct and in order
    # 0, 10, 50 and 100 (kept by --save_freq 10) where they come before the last, then the last: once each,
    # where '0 10 50 100 LAST' showed a column twice for 1, 11, 51 or 101 epochs.
    local last=$(($1 - 1)) epoch
    for epoch in 0 10 50 100; do
        if ((epoch < last)); then printf '%d ' "$epoch"; fi
    done
    echo "$last"
}

report() {  # report NAME...: each run's speed lines and its last lines, as one file in $OUT
    local name
    for name in "$@"; do
        echo "== $name"
        grep -E "Total time|total time|Accuracy|error" "$WORK/$name/stdout.txt" || true
        tail -n 15 "$WORK/$name/stdout.txt"
    done >"$OUT/stdout.txt" 2>&1
}
