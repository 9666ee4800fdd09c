#!/usr/bin/env bash
# 04: Keras's ImageNet VGG16 (the HDF5 file 02_data.sh fetched) -> captionjax's
# weight directory (params.npz with Keras's layer names, weights.json saying
# the input normalization: Caffe's BGR, 0..255, minus the mean pixel).
#
#   bash scripts/04_import_weights.sh [--dry_run]
#
# Writes $COCO_ROOT/weights/vgg16_imagenet; skipped when it is there.
. "$(dirname "$0")/common.sh"

H5="$DOWNLOADS/vgg16_weights_tf_dim_ordering_tf_kernels.h5"
if [ -f "$WEIGHTS/weights.json" ]; then
  say "weights imported already: $WEIGHTS"
  exit 0
fi
[ -f "$H5.checked" ] || die "no checked $H5: run 02_data.sh first"
captionjax import-weights --keras_h5="$H5" --output="$WEIGHTS.tmp"
rm -rf "$WEIGHTS" && mv "$WEIGHTS.tmp" "$WEIGHTS"
say "weights ready: $WEIGHTS"
