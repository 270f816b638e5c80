#!/usr/bin/env bash
# Linear probing (the paper's protocol: frozen encoder, BatchNorm + linear head, LARS).
# Usage: bash recipes/cifar10/linprobe.sh CHECKPOINT [NAME] [EPOCHS]
source "$(dirname "$0")/common.sh"
CKPT=${1:?give a pre-training checkpoint}
NAME=${2:-$(basename "$(dirname "$CKPT")")}
EPOCHS=${3:-90}
run main_linprobe.py --model vit_tiny_patch4 --input_size 32 --num_workers "$WORKERS" --seed "$SEED" \
    --data_path "$DATA" --nb_classes 10 --finetune "$CKPT" --cls_token \
    --batch_size $((1024 / NPROC)) --epochs "$EPOCHS" --warmup_epochs 10 --blr 0.1 --weight_decay 0.0 \
    --dist_eval --save_freq 30 --resume auto \
    --output_dir "$OUT/linprobe-$NAME" --log_dir "$OUT/linprobe-$NAME" "${EXTRA[@]}"
