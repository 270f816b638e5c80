#!/usr/bin/env bash
# MAE pre-training of the mini ViT (128-d, 6 blocks, patch 4) on the 50,000 CIFAR-10 training
# images, without their labels. Every epoch's checkpoint is kept (for the reconstruction strip),
# and the k-NN monitor scores the encoder every 2 epochs on the held-out split (10,000 bank and
# 2,000 query images of heldout/: hyper-parameter data, not the test set).
# Resumable: rerunning it continues from the newest checkpoint in its output folder.
source "$(dirname "$0")/common.sh"
"$PYTHON" main_pretrain.py "${CPU[@]}" --model mae_vit_mini_patch4 --input_size 32 --data_path "$DATA" \
    --mask_ratio 0.75 --norm_pix_loss --batch_size 256 --epochs "$PRETRAIN_EPOCHS" --warmup_epochs 3 \
    --blr 1.5e-3 --weight_decay 0.05 --keep_last 0 --vis_freq 5 --print_freq 50 --resume auto \
    --knn_data_path "$OUT/data/heldout" --knn_freq 2 --knn_bank_size 10000 --knn_query_size 2000 \
    --output_dir "$OUT/pretrain" --log_dir "$OUT/pretrain" "${EXTRA[@]}"
