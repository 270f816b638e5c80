#!/usr/bin/env bash
# Fine-tuning of a pre-trained encoder on CIFAR-10 (train) and evaluation on the test split.
# Usage: bash recipes/cifar10/finetune.sh CHECKPOINT [NAME] [EPOCHS]
# With CHECKPOINT "scratch", the same recipe starts from random initialisation.
source "$(dirname "$0")/common.sh"
CKPT=${1:?give a pre-training checkpoint, or scratch}
NAME=${2:-$(basename "$(dirname "$CKPT")")}
EPOCHS=${3:-100}
INIT=(--finetune "$CKPT")
[ "$CKPT" = scratch ] && INIT=() && NAME=${2:-scratch}
run main_finetune.py --model vit_tiny_patch4 --input_size 32 --num_workers "$WORKERS" --seed "$SEED" \
    --data_path "$DATA" --nb_classes 10 "${INIT[@]}" \
    --batch_size $((256 / NPROC)) --epochs "$EPOCHS" --warmup_epochs 5 --blr 1e-3 --layer_decay 0.75 \
    --weight_decay 0.05 --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --smoothing 0.1 \
    --dist_eval --save_freq 50 --resume auto \
    --output_dir "$OUT/finetune-$NAME" --log_dir "$OUT/finetune-$NAME" "${EXTRA[@]}"
