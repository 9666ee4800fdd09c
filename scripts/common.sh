# Sourced by the numbered scripts: flags, paths, settings and helpers.
#
# Every script takes one optional flag, --dry_run: the same steps on this
# machine's CPU in a few minutes, on stand-in data (scripts/dry_run_data.py
# writes small files with the layout of the real downloads; nothing is
# fetched from the network), with a few training steps at 32 pixels.
#
# Environment (optional):
#   COCO_ROOT  where everything goes (default: coco_run/ in the repository;
#              with --dry_run: $TMPDIR/captionjax_dry_run)
#   PYTHON     the Python to use (default: .venv/bin/python once
#              01_environment.sh made it, else python3)
#   VENV       the virtual env 01_environment.sh makes (default: .venv)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$(basename "$0")"
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry_run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "$SCRIPT: unknown argument '$arg' (usage: $SCRIPT [--dry_run])" >&2; exit 2 ;;
  esac
done

VENV="${VENV:-$REPO/.venv}"
if [ -z "${PYTHON:-}" ]; then
  if [ "$DRY_RUN" = 0 ] && [ -x "$VENV/bin/python" ]; then PYTHON="$VENV/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's captionjax
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"

if [ "$DRY_RUN" = 1 ]; then
  ROOT="${COCO_ROOT:-${TMPDIR:-/tmp}/captionjax_dry_run}"
else
  ROOT="${COCO_ROOT:-$REPO/coco_run}"
fi
DOWNLOADS="$ROOT/downloads"    # the fetched files, checked (02)
IMAGES="$ROOT/images"          # train2014/, val2014/, dataset_coco.json (02)
WEIGHTS="$ROOT/weights/vgg16_imagenet"  # import-weights' output (04)
RUN="$ROOT/runs/coco_vgg16"    # the training run (05)
CONFIG="$REPO/experiments/coco_vgg16/config.py"

# NeuralTalk2's recipe (experiments/coco_vgg16/config.py) and its dry-run miniature.
if [ "$DRY_RUN" = 1 ]; then
  IMAGE_SIZE=32            # VGG16 on 32x32 images (fc1 sized for it): seconds on a CPU
  FROZEN_STEPS=2           # caption steps with the CNN frozen (cached fc7 features)
  TOTAL_STEPS=4            # then fine-tuning up to this step
  SCST_STEPS=2             # then self-critical training (CIDEr-D reward) for this many steps
  TEST_IMAGES=4            # the stand-in test split
  PREPRO_FLAGS=(--num_workers=1 --no_progress)
  CURL_FLAGS=(-sS)
  export CAPTIONJAX_METEOR=0  # no Java start (12 s of CPU) for METEOR on stand-in captions
  TRAIN_FLAGS=(--no_progress --config.batch_size=2 --config.eval_every_steps=1000
               --config.eval_num_images=4 --config.eval_batch_size=4 --config.log_every_steps=1
               --config.checkpoint_every_steps=2 --config.dtype=float32)
else
  IMAGE_SIZE=224
  FROZEN_STEPS=100000
  TOTAL_STEPS=250000
  SCST_STEPS=106200        # experiments/coco_vgg16/config.py's scst_steps: 15 epochs
  TEST_IMAGES=5000         # Karpathy's test split
  PREPRO_FLAGS=()
  TRAIN_FLAGS=()
  CURL_FLAGS=(--progress-bar)
fi
FINAL_STEPS=$((TOTAL_STEPS + SCST_STEPS))
DATA="$ROOT/data/coco_$IMAGE_SIZE"  # prepro's records (03)
COMMON_TRAIN_FLAGS=(--config="$CONFIG" --workdir="$RUN" --config.dataset="$DATA"
                    --config.model.cnn_weights="$WEIGHTS" --config.beam_size=2)
# Stage 3 (05_train.sh), and 06_evaluate.sh's re-run of its final test.
SCST_TRAIN_FLAGS=("${COMMON_TRAIN_FLAGS[@]}" ${TRAIN_FLAGS[@]+"${TRAIN_FLAGS[@]}"}
                  --config.cached_features=False --config.finetune_cnn_after=0
                  --config.num_train_steps="$TOTAL_STEPS" --config.scst_steps="$SCST_STEPS")

say() { echo "[$SCRIPT] $*"; }
die() { echo "[$SCRIPT] error: $*" >&2; exit 1; }
captionjax() { "$PYTHON" -m captionjax.cli "$@"; }

# The latest checkpoint step of the training run (empty if none).
latest_step() {
  ls "$RUN/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -n 1 || true
}
