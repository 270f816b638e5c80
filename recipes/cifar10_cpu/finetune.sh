#!/usr/bin/env bash
# Fine-tuning of the mini ViT on 10% of the CIFAR-10 labels (5,000 images, 500 per class), from
# the MAE encoder or from scratch, with one budget for both: 50 epochs, the GPU recipe's
# augmentation and regularisation. Layer-wise lr decay protects pre-trained lower layers, so
# only the MAE start uses it (from scratch it would only slow the lower layers down).
# Usage: bash recipes/cifar10_cpu/finetune.sh mae|scratch SEED [SPLIT]
#   SPLIT: labels10-test (default; evaluated on the test set once, after the last epoch) or
#   labels10-val (the held-out validation split, evaluated every 5 epochs: for choosing settings)
source "$(dirname "$0")/common.sh"
INIT=${1:?mae or scratch}
SEED=${2:?seed}
SPLIT=${3:-labels10-test}
EPOCHS=${FT_EPOCHS:-50}
case "$INIT" in
    mae) START=(--finetune "$PRETRAINED" --layer_decay 0.75) ;;
    scratch) START=(--layer_decay 1.0) ;;
    *) echo "error: the first argument is mae or scratch, not $INIT" >&2; exit 2 ;;
esac
EVAL_FREQ=$EPOCHS
[ "$SPLIT" = labels10-val ] && EVAL_FREQ=5
NAME="finetune-$INIT-$SPLIT-s$SEED"
"$PYTHON" main_finetune.py "${CPU[@]}" --model vit_mini_patch4 --input_size 32 --data_path "$OUT/data/$SPLIT" \
    --nb_classes 10 "${START[@]}" --seed "$SEED" --batch_size 128 --epochs "$EPOCHS" --warmup_epochs 5 \
    --blr 1e-3 --weight_decay 0.05 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --smoothing 0.1 \
    --eval_freq "$EVAL_FREQ" --save_freq "$EPOCHS" --print_freq 20 --resume auto \
    --output_dir "$OUT/$NAME" --log_dir "$OUT/$NAME" "${EXTRA[@]}"
