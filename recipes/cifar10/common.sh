# Shared settings of the CIFAR-10 recipes; each recipe sources this file.
# Override any of them from the environment, e.g. DATA=/data/cifar10 NPROC=8 bash pretrain.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DATA=${DATA:-../shared/datasets/cifar10}   # <DATA>/train/<class>/*.jpg and <DATA>/test/<class>/*.jpg
OUT=${OUT:-out/cifar10}
NPROC=${NPROC:-1}                           # GPUs on this node
WORKERS=${WORKERS:-8}                       # loader processes per GPU
SEED=${SEED:-0}
PYTHON=${PYTHON:-python}
run() {  # run an entry point on NPROC GPUs
    if [ "$NPROC" -gt 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"
    else
        "$PYTHON" "$@"
    fi
}
read -r -a EXTRA <<< "${EXTRA:-}"            # extra flags appended to every command (last wins)
TINY32=(--model mae_vit_tiny_patch4 --input_size 32 --num_workers "$WORKERS" --seed "$SEED")
