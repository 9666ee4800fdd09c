#!/usr/bin/env bash
# 05: training, NeuralTalk2's two stages and self-critical training
# (experiments/coco_vgg16/config.py):
#   1. the CNN frozen: its fc7 features are computed once per image and cached,
#      the LSTM trains on them for 100,000 steps (batch 16 images x 5 captions);
#   2. fine-tuning: images through VGG16 at every step, the CNN with its own
#      Adam (1e-5), up to step 250,000;
#   3. self-critical training (SCST) on the CIDEr-D reward, the CNN as stage 2
#      left it, for 106,200 more steps.
#
#   bash scripts/05_train.sh [--dry_run]
#
# Writes $COCO_ROOT/runs/coco_vgg16 (checkpoints, train_log.jsonl, TensorBoard
# summaries; at the end of each stage the test split's beam-2 captions and
# scores: stage 1's are kept as $COCO_ROOT/scores_frozen.json, stage 2's as
# $COCO_ROOT/scores_finetuned.json). Resumable:
# `captionjax train` goes on from the latest checkpoint (interrupt it at any
# time); a finished stage is skipped.
. "$(dirname "$0")/common.sh"

[ -f "$DATA/dataset_info.json" ] || die "no records in $DATA: run 03_prepro.sh first"
[ -f "$WEIGHTS/weights.json" ] || die "no weights in $WEIGHTS: run 04_import_weights.sh first"
step="$(latest_step)"

if [ "${step:-0}" -ge "$FROZEN_STEPS" ]; then
  say "stage 1 (frozen CNN) done already: checkpoint $step"
else
  say "stage 1: frozen CNN, cached fc7 features, steps ${step:-0}..$FROZEN_STEPS"
  captionjax train "${COMMON_TRAIN_FLAGS[@]}" ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} \
      --config.cached_features=True --config.finetune_cnn_after=-1 \
      --config.num_train_steps="$FROZEN_STEPS" --config.scst_steps=0
  cp "$RUN/scores.json" "$ROOT/scores_frozen.json"
fi

step="$(latest_step)"
if [ "${step:-0}" -ge "$TOTAL_STEPS" ] && [ -f "$ROOT/scores_finetuned.json" ]; then
  say "stage 2 (fine-tuning) done already"
else
  say "stage 2: fine-tuning VGG16, steps $step..$TOTAL_STEPS"
  captionjax train "${COMMON_TRAIN_FLAGS[@]}" ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"} \
      --config.cached_features=False --config.finetune_cnn_after=0 \
      --config.num_train_steps="$TOTAL_STEPS" --config.scst_steps=0
  cp "$RUN/scores.json" "$ROOT/scores_finetuned.json"
fi

step="$(latest_step)"
if [ "${step:-0}" -ge "$FINAL_STEPS" ] && [ "$RUN/scores.json" -nt "$RUN/checkpoints/$step" ]; then
  say "stage 3 (self-critical training) done already: checkpoint $step"
else
  say "stage 3: self-critical training, steps $step..$FINAL_STEPS"
  captionjax train "${SCST_TRAIN_FLAGS[@]}"
fi
say "training done: $RUN"
