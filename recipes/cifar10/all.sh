#!/usr/bin/env bash
# Every row of the README's CIFAR-10 table, in order. Each step resumes where it stopped.
source "$(dirname "$0")/common.sh"
R=recipes/cifar10
bash $R/pretrain.sh 0.75 400
bash $R/finetune.sh "$OUT/pretrain-r0.75-e400/checkpoint-399.pth"
bash $R/finetune.sh scratch
bash $R/linprobe.sh "$OUT/pretrain-r0.75-e400/checkpoint-399.pth"
for ratio in 0.5 0.9; do  # the masking-ratio study, at a reduced budget
    bash $R/pretrain.sh $ratio 100
    bash $R/linprobe.sh "$OUT/pretrain-r$ratio-e100/checkpoint-99.pth"
done
bash $R/pretrain.sh 0.75 100
bash $R/linprobe.sh "$OUT/pretrain-r0.75-e100/checkpoint-99.pth"
