#!/usr/bin/env bash
# Device command: the held-out checks of the fine-tuning recipe, before the test rows: MAE and
# scratch on labels10-val, and MAE on heldout (45,000 labels), seed 0, scored every 5 epochs on
# 5,000 images held out of the training set (never the test set). Needs the encoder in $ENCODER.
source "$(dirname "$0")/common.sh"
require_encoder
unpack
status=0
together "mae 0 labels10-val" "scratch 0 labels10-val" "mae 0 heldout" || status=$?
report finetune-{mae,scratch}-labels10-val-s0 finetune-mae-heldout-s0
exit "$status"
