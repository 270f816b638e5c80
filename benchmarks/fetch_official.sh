#!/usr/bin/env bash
# Extract the official MAE code (github:facebookresearch/mae) from a git clone or mirror into a
# git-ignored folder, for the side-by-side rows of gpu_check.sh and the CPU recipe check
# official_parity.py. Its licence is CC-BY-NC: it is read from there at run time
# (benchmarks/gpu_check_official.py) and never committed here.
#
#   bash benchmarks/fetch_official.sh PATH_TO_CLONE_OR_GIT_DIR [DEST]    # DEST: benchmarks/official_mae
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $# -lt 1 ]]; then
    echo "usage: bash benchmarks/fetch_official.sh PATH_TO_CLONE_OR_GIT_DIR [DEST]" >&2
    exit 2
fi
SOURCE=$1
DEST=${2:-benchmarks/official_mae}
if ! git -C "$SOURCE" rev-parse --verify -q HEAD >/dev/null; then
    echo "error: $SOURCE is not a git clone or git directory of github:facebookresearch/mae" >&2
    exit 2
fi
# What the checks import (gpu_check_official.MODULES), main_pretrain.py (whose data pipeline gpu_check_e2e
# restates: read beside it), and the licence that comes with them.
FILES=(LICENSE models_mae.py models_vit.py engine_pretrain.py engine_finetune.py main_pretrain.py util/misc.py
    util/lr_sched.py util/lr_decay.py util/lars.py util/pos_embed.py)
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
git -C "$SOURCE" archive --format=tar HEAD "${FILES[@]}" | tar -x -C "$DEST.tmp"
git -C "$SOURCE" rev-parse HEAD >"$DEST.tmp/COMMIT"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "extracted the official code at $(cat "$DEST/COMMIT") into $DEST ($(du -sh "$DEST" | cut -f1))"
