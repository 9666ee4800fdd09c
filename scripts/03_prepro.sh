#!/usr/bin/env bash
# 03: the records: every image of Karpathy's splits resized to VGG16's 224x224
# and JPEG-encoded, with its captions (at most 16 words; words seen fewer than
# 5 times become UNK, as NeuralTalk2's prepro). restval joins train: 113,287
# training images, 5,000 validation, 5,000 test.
#
#   bash scripts/03_prepro.sh [--dry_run]
#
# Writes $COCO_ROOT/data/coco_224 (vocab.json, dataset_info.json, annotations,
# TFRecord shards). `captionjax prepro` does nothing when its output is up to
# date with the same inputs and flags. Uses every CPU core: about 210 images/s
# per core (the README's GPU section), so about 40 s on 16 cores.
. "$(dirname "$0")/common.sh"

[ -f "$IMAGES/dataset_coco.json" ] || die "no $IMAGES/dataset_coco.json: run 02_data.sh first"
captionjax prepro --karpathy_json="$IMAGES/dataset_coco.json" --images_root="$IMAGES" \
    --image_size="$IMAGE_SIZE" --max_length=16 --word_count_threshold=5 \
    --output_dir="$DATA" ${PREPRO_FLAGS[@]+"${PREPRO_FLAGS[@]}"}
say "records ready: $DATA"
