#!/usr/bin/env bash
# Frozen-encoder rows: k-NN (k=20, t=0.07) and a linear classifier on cached features (100
# epochs), with all 50,000 labelled training images as the bank and the 10,000 test images as
# queries, for the MAE encoder, the random-init encoder and raw pixels.
# Usage: bash recipes/cifar10_cpu/frozen.sh [DATA_SPLIT]   (default: the full data; heldout for choosing)
source "$(dirname "$0")/common.sh"
SET=${1:-$DATA}
"$PYTHON" knn_eval.py "${CPU[@]}" --model mae_vit_mini_patch4 --data_path "$SET" --linear_epochs 100 \
    --encoders "$PRETRAINED" random pixels --output "$OUT/frozen.json" "${EXTRA[@]}"
