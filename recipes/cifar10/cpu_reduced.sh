#!/usr/bin/env bash
# The CIFAR-10 pipeline at a size a 2-core CPU finishes in about half an hour: 5,000 training
# images (500 per class), 2,000 test images, 10 pre-training and 5 fine-tuning epochs.
# Same recipes as on the GPU; only the data, epochs and batch sizes are reduced.
export WORKERS=${WORKERS:-1}  # one loader process: the other core trains
source "$(dirname "$0")/common.sh"
FULL=${DATA}
OUT=${OUT:-out/cifar10}-cpu
SUB="$OUT/data"
for split_n in train:500 test:200; do
    split=${split_n%%:*}; n=${split_n##*:}
    for dir in "$FULL/$split"/*/; do
        cls=$(basename "$dir"); mkdir -p "$SUB/$split/$cls"
        mapfile -t files < <(ls "$dir" | sort)
        for f in "${files[@]:0:$n}"; do ln -sf "$(realpath "$dir/$f")" "$SUB/$split/$cls/$f"; done
    done
done
export DATA="$SUB" OUT
R=recipes/cifar10
# a short schedule needs a larger step than the 400-epoch recipe: blr 1.5e-3 instead of 1.5e-4
EXTRA="--device cpu --precision fp32 --batch_size 128 --blr 1.5e-3 --print_freq 20" bash $R/pretrain.sh 0.75 10
CKPT="$OUT/pretrain-r0.75-e10/checkpoint-9.pth"
EXTRA="--device cpu --precision fp32 --batch_size 64 --warmup_epochs 1 --print_freq 20" bash $R/finetune.sh "$CKPT" mae 5
EXTRA="--device cpu --precision fp32 --batch_size 64 --warmup_epochs 1 --print_freq 20" bash $R/finetune.sh scratch scratch 5
EXTRA="--device cpu --precision fp32 --batch_size 256 --warmup_epochs 1 --print_freq 20" bash $R/linprobe.sh "$CKPT" mae 5
for run in finetune-mae finetune-scratch linprobe-mae; do
    echo "$run: $(tail -n 1 "$OUT/$run/log.txt")"
done
