# Shared settings of the CPU-scale CIFAR-10 study (README: "Results on a 2-core CPU").
# Each script of the study sources this file; override any setting from the environment,
# e.g. OUT=/scratch/study bash recipes/cifar10_cpu/pretrain.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DATA=${DATA:-../shared/datasets/cifar10}   # <DATA>/train/<class>/*.jpg and <DATA>/test/<class>/*.jpg
OUT=${OUT:-out/cifar10_cpu}
PYTHON=${PYTHON:-python}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-30}
PRETRAINED="$OUT/pretrain/checkpoint-$((PRETRAIN_EPOCHS - 1)).pth"
# One loader process: the other core trains. fp32: this CPU has no fast bf16.
CPU=(--device cpu --precision fp32 --num_workers 1)
read -r -a EXTRA <<< "${EXTRA:-}"            # extra flags appended to every command (last wins)
