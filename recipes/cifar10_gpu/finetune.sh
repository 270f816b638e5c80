#!/usr/bin/env bash
# One fine-tuning run of the classifier of $MAE_MODEL, from the bf16 MAE encoder or from scratch,
# with the same recipe for both (layer-wise lr decay for the pre-trained start only, as in the
# CPU study), evaluated on the 32-px images as they are (--crop_pct 1.0). Its log.txt goes to $OUT
# as finetune-INIT-SPLIT-sSEED-log.txt.
# Usage: bash recipes/cifar10_gpu/finetune.sh mae|scratch SEED SPLIT   (after data.py unpack, which the
# session scripts run)
#   SPLIT: labels100-test (all 50,000 labels; the test set once, after the last epoch),
#   labels10-test (5,000 labels), or, for choosing settings, heldout or labels10-val (scored
#   every 5 epochs on 5,000 images held out of the training set)
source "$(dirname "$0")/common.sh"
INIT=${1:?mae or scratch}
SEED=${2:?seed}
SPLIT=${3:?labels100-test, labels10-test, heldout or labels10-val}
case "$INIT" in
    mae) START=(--finetune "$ENCODER" --layer_decay 0.75) ;;
    scratch) START=(--layer_decay 1.0) ;;
    *) echo "error: the first argument is mae or scratch, not $INIT" >&2; exit 2 ;;
esac
case "$SPLIT" in
    labels100-test) SET=$DATA EPOCHS=$FT_EPOCHS BATCH=512 WARMUP=5 EVAL_FREQ=$FT_EPOCHS ;;
    heldout) SET=$SPLITS/heldout EPOCHS=$FT_EPOCHS BATCH=512 WARMUP=5 EVAL_FREQ=5 ;;
    labels10-test) SET=$SPLITS/labels10-test EPOCHS=$FT10_EPOCHS BATCH=256 WARMUP=10 EVAL_FREQ=$FT10_EPOCHS ;;
    labels10-val) SET=$SPLITS/labels10-val EPOCHS=$FT10_EPOCHS BATCH=256 WARMUP=10 EVAL_FREQ=5 ;;
    *) echo "error: the third argument is labels100-test, labels10-test, heldout or labels10-val, not $SPLIT" >&2; exit 2 ;;
esac
SHARING=${SHARING:-1}                                   # runs sharing the GPU (together in common.sh)
WORKERS=${WORKERS:-$((16 / SHARING - 1))}               # the device's 16 cores, shared
NAME="finetune-$INIT-$SPLIT-s$SEED"
rm -rf "${WORK:?}/$NAME" && mkdir -p "$WORK/$NAME"  # a run of its own: its time and log are all its training
status=0
timed "$NAME" "$SHARING" "$PYTHON" main_finetune.py --model "${MAE_MODEL#mae_}" --input_size "$INPUT_SIZE" \
    --data_path "$SET" --nb_classes 10 "${START[@]}" --seed "$SEED" --batch_size "$BATCH" --epochs "$EPOCHS" \
    --warmup_epochs "$WARMUP" --blr 5e-4 --weight_decay 0.05 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 \
    --reprob 0.25 --smoothing 0.1 --crop_pct 1.0 --eval_freq "$EVAL_FREQ" --save_freq "$EPOCHS" --print_freq 50 \
    --num_workers "$WORKERS" --output_dir "$WORK/$NAME" --log_dir "$WORK/$NAME" "${EXTRA_ARGS[@]}" \
    >"$WORK/$NAME/stdout.txt" 2>&1 || status=$?
[ -f "$WORK/$NAME/log.txt" ] && cp "$WORK/$NAME/log.txt" "$OUT/$NAME-log.txt"
exit "$status"
