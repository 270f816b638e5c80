#!/usr/bin/env bash
# Device command: the four 10%-label rows (5,000 labelled images, scored once on the 10,000 test
# images), MAE and scratch, seeds 0 and 1, all four at once on the GPU. Needs the encoder
# (pretrain.sh leaves it in $ENCODER; a later session carries it there).
source "$(dirname "$0")/common.sh"
require_encoder
unpack
RUNS=("mae 0 labels10-test" "scratch 0 labels10-test" "mae 1 labels10-test" "scratch 1 labels10-test")
status=0
together "${RUNS[@]}" || status=$?
report finetune-{mae,scratch}-labels10-test-s{0,1}
exit "$status"
