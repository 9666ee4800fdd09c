#!/usr/bin/env bash
# 06: the final evaluation: the trained captioner's beam-2 captions of
# Karpathy's 5,000 test images, scored with coco-caption's metrics (BLEU 1-4,
# METEOR with Java, ROUGE-L, CIDEr-D), gathered into one $COCO_ROOT/scores.json
# with the frozen-CNN and fine-tuning stages' scores beside them.
#
#   bash scripts/06_evaluate.sh [--dry_run]
#
# The training run captions and scores the test split when it ends; this step
# re-runs only that (the same `captionjax train` command on the finished run)
# when its scores are older than the latest checkpoint, then writes scores.json.
. "$(dirname "$0")/common.sh"

step="$(latest_step)"
[ "${step:-0}" -ge "$FINAL_STEPS" ] || die "the run is at step ${step:-0} of $FINAL_STEPS: run 05_train.sh first"
if [ "$RUN/scores.json" -nt "$RUN/checkpoints/$step" ]; then
  say "test scores of checkpoint $step: up to date"
else
  say "captioning and scoring the test split with checkpoint $step"
  captionjax train "${SCST_TRAIN_FLAGS[@]}"
fi

"$PYTHON" - "$RUN" "$ROOT" "$step" "$TEST_IMAGES" <<'PY'
import json, os, sys
run, root, step, want = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(os.path.join(run, "scores.json"), encoding="utf-8") as f:
  scores = json.load(f)
with open(os.path.join(run, "captions.json"), encoding="utf-8") as f:
  n = len(json.load(f))
if n != want:
  raise SystemExit(f"06_evaluate.sh: {n} test images captioned, expected {want}")
metrics = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
pick = lambda s: {k: s[k] for k in metrics if k in s}


def stage(name):
  """The metrics an earlier stage's final test kept as scores_NAME.json (None if absent)."""
  path = os.path.join(root, f"scores_{name}.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return pick(json.load(f))


out = {"test_images": n, "beam_size": scores.get("splits", {}).get("beam_size"), "step": step,
       "scst": pick(scores), "finetuned": stage("finetuned"), "frozen_cnn": stage("frozen"),
       "run": os.path.abspath(run)}
tmp = os.path.join(root, "scores.json.tmp")
with open(tmp, "w", encoding="utf-8") as f:
  json.dump(out, f, indent=1)
os.replace(tmp, os.path.join(root, "scores.json"))
print(json.dumps(out, indent=1))
PY
say "final scores: $ROOT/scores.json"
