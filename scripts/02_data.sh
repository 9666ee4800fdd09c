#!/usr/bin/env bash
# 02: the data: COCO 2014's train and val images (20 GB), Karpathy's splits
# (dataset_coco.json) and Keras's ImageNet VGG16 weights (553 MB), each checked
# against its size and checksum (scripts/downloads.tsv), then unpacked.
#
#   bash scripts/02_data.sh [--dry_run]
#
# Writes $COCO_ROOT/downloads/ (the files, SHA256SUMS) and $COCO_ROOT/images/
# (train2014/, val2014/, dataset_coco.json). Resumable: an interrupted download
# goes on where it stopped (curl -C -); a checked file is not fetched again, an
# unpacked archive not unpacked again. A file that fails its check is moved to
# NAME.bad and the script stops. --dry_run fetches small stand-ins written by
# scripts/dry_run_data.py (file:// URLs) instead: nothing goes over the network.
. "$(dirname "$0")/common.sh"

TABLE="$REPO/scripts/downloads.tsv"
if [ "$DRY_RUN" = 1 ]; then
  "$PYTHON" "$REPO/scripts/dry_run_data.py" --output="$ROOT/stand_ins" --image_size="$IMAGE_SIZE"
  TABLE="$ROOT/stand_ins/downloads.tsv"
fi
mkdir -p "$DOWNLOADS" "$IMAGES"

checksum() {  # checksum ALGO FILE -> hex digest
  "$PYTHON" - "$1" "$2" <<'PY'
import hashlib, sys
h = hashlib.new(sys.argv[1])
with open(sys.argv[2], "rb") as f:
  for block in iter(lambda: f.read(1 << 22), b""):
    h.update(block)
print(h.hexdigest())
PY
}

while IFS=$'\t' read -r name url size sum; do
  case "$name" in ''|'#'*) continue ;; esac
  out="$DOWNLOADS/$name"
  if [ -f "$out.checked" ]; then
    say "$name: checked already"
    continue
  fi
  have=$(stat -c %s "$out" 2>/dev/null || echo 0)
  if [ "$have" -lt "$size" ]; then
    if [ "$have" -gt 0 ]; then resume=", $have already here: resuming"; else resume=""; fi
    say "$name: fetching $url ($size bytes$resume)"
    curl -fL "${CURL_FLAGS[@]}" --retry 5 --retry-delay 10 -C - -o "$out" "$url"
  fi
  have=$(stat -c %s "$out")
  algo="${sum%%:*}" want="${sum#*:}"
  got=$(checksum "$algo" "$out")
  if [ "$have" != "$size" ] || [ "$got" != "$want" ]; then
    mv "$out" "$out.bad"
    die "$name: $have bytes, $algo $got; expected $size bytes, $algo $want (moved to $out.bad)"
  fi
  sha=$(if [ "$algo" = sha256 ]; then echo "$got"; else checksum sha256 "$out"; fi)
  echo "$sha  $name" >> "$DOWNLOADS/SHA256SUMS"
  touch "$out.checked"
  say "$name: $size bytes, $algo checked"
done < "$TABLE"

unpack() {  # unpack ARCHIVE [MEMBER]: into $IMAGES, once
  local marker="$IMAGES/.${1%.zip}.unpacked"
  if [ -f "$marker" ]; then say "$1: unpacked already"; return; fi
  say "$1: unpacking into $IMAGES"
  "$PYTHON" - "$DOWNLOADS/$1" "$IMAGES" "${2:-}" <<'PY'
import sys, zipfile
archive, out, member = sys.argv[1:4]
with zipfile.ZipFile(archive) as z:
  if member:
    z.extract(member, out)
  else:
    z.extractall(out)
PY
  touch "$marker"
}
unpack train2014.zip
unpack val2014.zip
unpack caption_datasets.zip dataset_coco.json
say "data ready: $IMAGES ($(ls "$IMAGES/train2014" | wc -l) train2014 and $(ls "$IMAGES/val2014" | wc -l) val2014 images)"
