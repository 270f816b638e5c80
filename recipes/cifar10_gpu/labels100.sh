#!/usr/bin/env bash
# Device command: the all-label rows of one seed (50,000 labelled images, scored once on the
# 10,000 test images), MAE and scratch at once on the GPU. Needs the encoder in $ENCODER.
# Usage: bash recipes/cifar10_gpu/labels100.sh SEED
source "$(dirname "$0")/common.sh"
SEED=${1:?seed}
require_encoder
unpack
status=0
together "mae $SEED labels100-test" "scratch $SEED labels100-test" || status=$?
report "finetune-mae-labels100-test-s$SEED" "finetune-scratch-labels100-test-s$SEED"
exit "$status"
