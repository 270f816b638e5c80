#!/usr/bin/env bash
# Device command: unpack the data; pre-train the MAE on the 50,000 training images without their
# labels (k-NN monitor on heldout/ and a checkpoint kept every 10 epochs); score the frozen
# encoder (k-NN and a linear classifier: MAE, random init, raw pixels; the test set once); draw
# the reconstructions over epochs and the k-NN curve; export the encoder in bf16 for fine-tuning.
# What comes back ($OUT, 7 files): pretrain-log.txt, stdout.txt, times.jsonl, frozen.json,
# reconstructions.png, knn-curve.png, mae-encoder-bf16.safetensors.
source "$(dirname "$0")/common.sh"
unpack
RUN=$WORK/pretrain
# A run of its own: its wall time is all of its training, its log all its epochs.
rm -rf "${RUN:?}" "$WORK/knn_curve.json" && mkdir -p "$RUN"
status=0
# What follows pre-training needs about a minute; the rest of the deadline is reserved for it.
AFTER=${AFTER_PRETRAIN:-120}
limit=$(($(ms_left) / 1000 - AFTER))
((limit > ${PRETRAIN_LIMIT:-450})) && limit=${PRETRAIN_LIMIT:-450}
LIMIT=$limit timed pretrain 1 "$PYTHON" main_pretrain.py --model "$MAE_MODEL" \
    --input_size "$INPUT_SIZE" --loader "$LOADER" --data_path "$DATA" --mask_ratio 0.75 --norm_pix_loss \
    --batch_size 1024 --epochs "$PRETRAIN_EPOCHS" --warmup_epochs $((PRETRAIN_EPOCHS / 10)) --blr 3.75e-4 \
    --weight_decay 0.05 --save_freq 10 --vis_freq 10 --print_freq 100 --num_workers 15 \
    --knn_data_path "$SPLITS/heldout" --knn_freq 10 --knn_bank_size 10000 --knn_query_size 2000 \
    --output_dir "$RUN" --log_dir "$RUN" "${EXTRA_ARGS[@]}" >"$RUN/stdout.txt" 2>&1 || status=$?
report pretrain
[[ -f $RUN/log.txt ]] && cp "$RUN/log.txt" "$OUT/pretrain-log.txt"
# The newest checkpoint: the last epoch's, or where a run stopped at its time limit (the log says which).
LAST=$(ls -t "$RUN"/checkpoint-*.pth 2>/dev/null | head -n 1 || true)
if [[ -z $LAST ]]; then # nothing to export or score: stdout.txt (already in $OUT) says why
    echo "pre-training left no checkpoint (status $status): see stdout.txt" >&2
    exit $((status ? status : 1))
fi
echo "encoder: $LAST"
# The encoder first: the next commands need it, the rows below do not.
mkdir -p "$(dirname "$ENCODER")"
LIMIT=30 timed export 1 "$PYTHON" $R/export_encoder.py "$LAST" "$OUT/mae-encoder-bf16.safetensors" &&
    cp "$OUT/mae-encoder-bf16.safetensors" "$ENCODER" || status=$?
LIMIT=90 timed frozen 1 "$PYTHON" knn_eval.py --data_path "$DATA" --linear_epochs 100 --num_workers 15 \
    --encoders "$LAST" random pixels --output "$OUT/frozen.json" "${EXTRA_ARGS[@]}" || status=$?
LIMIT=60 timed knn-random-heldout 1 "$PYTHON" knn_eval.py --data_path "$SPLITS/heldout" --model "$MAE_MODEL" \
    --input_size "$INPUT_SIZE" --knn_bank_size 10000 --knn_query_size 2000 --num_workers 15 --encoders random \
    --output "$WORK/knn_curve.json" "${EXTRA_ARGS[@]}" || status=$?
read -r -a STRIP <<<"${STRIP_EPOCHS:-$(strip_epochs "$PRETRAIN_EPOCHS")}"
LIMIT=60 timed pictures 1 "$PYTHON" $R/pictures.py --work "$WORK" --images "$DATA/test" --epochs "${STRIP[@]}" \
    --dest "$OUT" || status=$?
exit "$status"
