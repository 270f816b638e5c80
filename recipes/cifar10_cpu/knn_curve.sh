#!/usr/bin/env bash
# k-NN top-1 against pre-training epoch, from the kept checkpoints (for a run made without
# --knn_data_path; pretrain.sh now logs the same scores as it trains). Hyper-parameter data
# only: the bank is 10,000 images of heldout/train, the queries 2,000 of heldout/val.
# Usage: bash recipes/cifar10_cpu/knn_curve.sh [CHECKPOINT ...]   (default: every epoch's)
source "$(dirname "$0")/common.sh"
if [ $# -eq 0 ]; then
    mapfile -t CKPTS < <(ls "$OUT"/pretrain/checkpoint-*.pth | grep -v step | sort -t- -k2 -n)
else
    CKPTS=("$@")
fi
"$PYTHON" knn_eval.py "${CPU[@]}" --model mae_vit_mini_patch4 --data_path "$OUT/data/heldout" \
    --knn_bank_size 10000 --knn_query_size 2000 --encoders "${CKPTS[@]}" --output "$OUT/knn_curve.json" "${EXTRA[@]}"
