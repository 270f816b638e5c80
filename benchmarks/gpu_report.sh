#!/usr/bin/env bash
# The GPU measurements of the speed table, in one go, on a machine with one GPU and its cores:
# the CUDA tests, the training step of ViT-B and ViT-L MAE (fp32 eager baseline, bf16 eager,
# bf16 compiled) at batch 256, the three loaders at ImageNet resolution, and the loaders feeding
# the compiled bf16 step. Rows are printed and written as JSON into OUT.
#
#   DATA=/path/to/imagenet/train bash benchmarks/gpu_report.sh [OUT]
#
# PART=tests|model|loader|e2e runs one part only (each takes a few minutes on an H100; the
# model and e2e parts compile each model once).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-bench_gpu}
DATA=${DATA:-../shared/datasets/imagenet-1k-samples}
PYTHON=${PYTHON:-python}
WORKERS=${WORKERS:-$(($(nproc) - 2))}  # leave the main process and the system a core each
MODELS=${MODELS:-mae_vit_base_patch16,mae_vit_large_patch16}
BATCH=${BATCH:-256}
PART=${PART:-all}
mkdir -p "$OUT"
bench() { "$PYTHON" -m benchmarks.bench_pretrain "$@"; }

if [[ $PART == all || $PART == tests ]]; then
    "$PYTHON" -m pytest -q tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"
fi
if [[ $PART == all || $PART == model ]]; then
    bench --mode model --model "$MODELS" --batch_size "$BATCH" --precision bf16 --compile \
        --steps 30 --warmup 10 --json "$OUT/bench_model.json"
fi
if [[ $PART == all || $PART == loader ]]; then
    bench --mode loader --loader fast,device,torchvision --data_path "$DATA" --batch_size "$BATCH" \
        --num_workers "1,$WORKERS" --loader_images 6000 --warmup 3 --repeats 3 --json "$OUT/bench_loader.json"
fi
if [[ $PART == all || $PART == e2e ]]; then
    bench --mode e2e --model "$MODELS" --batch_size "$BATCH" --precision bf16 --compile \
        --loader fast,device --data_path "$DATA" --num_workers "$WORKERS" --steps 30 --warmup 10 \
        --json "$OUT/bench_e2e.json"
fi
