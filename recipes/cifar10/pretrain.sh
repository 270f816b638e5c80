#!/usr/bin/env bash
# MAE pre-training of ViT-Tiny (patch 4) on the 50,000 CIFAR-10 training images.
# Usage: bash recipes/cifar10/pretrain.sh [MASK_RATIO] [EPOCHS]   (defaults 0.75, 400)
# Resumable: rerunning it continues from the newest checkpoint in its output folder.
source "$(dirname "$0")/common.sh"
RATIO=${1:-0.75}
EPOCHS=${2:-400}
run main_pretrain.py "${TINY32[@]}" --data_path "$DATA" --mask_ratio "$RATIO" --norm_pix_loss \
    --batch_size $((512 / NPROC)) --epochs "$EPOCHS" --warmup_epochs $((EPOCHS / 20)) --blr 1.5e-4 \
    --weight_decay 0.05 --save_freq 100 --vis_freq 50 --resume auto \
    --output_dir "$OUT/pretrain-r$RATIO-e$EPOCHS" --log_dir "$OUT/pretrain-r$RATIO-e$EPOCHS" "${EXTRA[@]}"
