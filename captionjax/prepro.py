"""`captionjax prepro`: a captioning data set -> vocabulary + record shards.

Inputs (one of; see `captionjax.datasets`):
  --input_json=raw.json            NeuralTalk2's raw format
  --karpathy_json=dataset_coco.json  Karpathy's splits (COCO, Flickr8k, Flickr30k)
  --flickr_token=Flickr8k.token.txt  Flickr's own layout, with its split lists
  --captions_csv=captions.csv      `image,caption` rows, one per caption
  --tfds=coco_captions --tfds_data_dir=DIR   a prepared TFDS set, offline

`prepro()` reads top to bottom: the items' splits and ids, the up-to-date
check, then two passes in a temporary folder beside the output:
  pass 1 (`decode_images`): every image decoded, resized to [image_size,
    image_size, 3] and re-encoded (JPEG or PNG) on all cores, into one
    temporary file; a broken image is skipped and named, never fatal;
  the vocabulary (`build_vocabulary`), from the captions of the training
    images that were kept;
  pass 2 (`write_records`): one record per kept image with its encoded
    captions [num_captions, max_length], the references, the info;
  `_swap_in`: the output directory's prepro files replaced in one go.
The output directory is only replaced when everything succeeded, so
re-running with the same arguments is idempotent: the output files are byte
for byte the same (records are serialized with sorted map keys; the time
taken is printed, not stored), whatever the number of workers or process. A re-run whose items, image files (size and mtime) and
settings match the fingerprint stored in `dataset_info.json` does nothing
(`--force` redoes it).

With more than one worker, pass 1 runs in `captionjax.pool`: when the OS
kills a worker (out of memory), the image it was decoding is named on stderr
and retried once in a fresh worker; if that worker dies too, the image is
skipped like a broken one (named in `skipped` and on stderr) and the run goes
on. With one worker the images are decoded in the main process.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time

from tqdm import tqdm

from captionjax import datasets
from captionjax import images
from captionjax import pool
from captionjax import records
from captionjax import vocab as vocab_lib

SPLIT_SEED = 123  # NeuralTalk2's prepro shuffled with seed 123
DEFAULT_SHARD_SIZE = 2048  # images per record shard
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 4096  # pixels a side of the stored images
MIN_USEFUL_VOCAB = 10  # fewer words than this gets a warning (--word_count_threshold too high)
_LEN = struct.Struct("<qI")  # item index, byte count


def add_arguments(p):
  src = p.add_argument_group("input (one of)").add_mutually_exclusive_group()
  src.add_argument("--input_json", help="NeuralTalk2 raw JSON: [{file_path, captions, id?}]")
  src.add_argument("--karpathy_json",
                   help="Karpathy's split file: dataset_{coco,flickr8k,flickr30k}.json")
  src.add_argument("--flickr_token",
                   help="Flickr8k.token.txt or Flickr30k's results_20130124.token "
                        "(IMAGE.jpg#N<TAB>caption)")
  src.add_argument("--captions_csv", help="a CSV of image,caption rows, one row per caption")
  src.add_argument("--tfds", help="a prepared TFDS data set, e.g. coco_captions (read offline)")
  p.add_argument("--tfds_data_dir", default=None, help="TFDS data directory for --tfds")
  p.add_argument("--restval", choices=datasets.RESTVAL_CHOICES, default="train",
                 help="Karpathy/TFDS 'restval' images: fold into train (default), "
                      "keep as their own split, or drop")
  for split, name in datasets.FLICKR8K_LISTS.items():
    p.add_argument(f"--{split}_list", default=None,
                   help=f"--flickr_token: file of {split} image names "
                        f"(default: {name} beside the token file)")
  p.add_argument("--images_root", default="", help="folder the file paths are relative to")
  p.add_argument("--output_dir", required=True, help="where vocab, info and shards go")
  p.add_argument("--num_val", type=int, default=5000,
                 help="images for validation (when items carry no 'split')")
  p.add_argument("--num_test", type=int, default=5000,
                 help="images for test (when items carry no 'split')")
  p.add_argument("--max_length", type=int, default=16, help="captions are cut at this many words")
  p.add_argument("--word_count_threshold", type=int, default=5,
                 help="keep words seen more than this many times, the rest become UNK")
  p.add_argument("--vocab_from_all_splits", action="store_true",
                 help="count words in every split's captions (NeuralTalk2), not only train")
  p.add_argument("--image_size", type=int, default=256, help="images are resized to this square")
  p.add_argument("--image_format", choices=["jpeg", "png"], default="jpeg",
                 help="how resized images are stored in the records")
  p.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
  p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                 help="processes that decode images")
  p.add_argument("--max_pixels", type=int, default=images.MAX_PIXELS,
                 help="images with more pixels are skipped (a decompression-bomb limit)")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.add_argument("--force", action="store_true",
                 help="redo the work even when OUTPUT_DIR is up to date")


def load_items(args, notes: list, spill_dir: str) -> tuple[list[dict], dict]:
  """The items named by the command-line source flags, and a description."""
  if args.input_json:
    return datasets.read_raw_json(args.input_json), {"input_json": args.input_json}
  if args.karpathy_json:
    items = datasets.read_karpathy_json(args.karpathy_json, args.restval, notes)
    return items, {"karpathy_json": args.karpathy_json, "restval": args.restval}
  if args.flickr_token:
    lists = {s: getattr(args, f"{s}_list") for s in datasets.FLICKR8K_LISTS}
    lists = {s: p for s, p in lists.items() if p} or None
    items = datasets.read_flickr_token(args.flickr_token, lists, notes)
    return items, {"flickr_token": args.flickr_token}
  if args.captions_csv:
    return datasets.read_captions_csv(args.captions_csv, notes), {
        "captions_csv": args.captions_csv}
  if args.tfds:
    if not args.tfds_data_dir:
      raise datasets.DataError("--tfds needs --tfds_data_dir (the data is read offline)")
    items = datasets.read_tfds(args.tfds, args.tfds_data_dir,
                               os.path.join(spill_dir, "tfds_images.bin"), args.restval,
                               notes=notes, progress=not args.no_progress)
    return items, {"tfds": args.tfds, "restval": args.restval}
  raise datasets.DataError("no input given: pass one of --input_json, --karpathy_json, "
                           "--flickr_token, --captions_csv, --tfds")


def run(args) -> int:
  parent = os.path.dirname(os.path.abspath(args.output_dir))
  spill_dir = None
  try:
    notes = []
    if args.tfds:
      os.makedirs(parent, exist_ok=True)
      spill_dir = tempfile.mkdtemp(prefix=".prepro-tfds-", dir=parent)
    items, source = load_items(args, notes, spill_dir)
    for n in notes:
      print(f"prepro: note: {n}", file=sys.stderr)
    info = prepro(
        items, args.output_dir, images_root=args.images_root,
        num_val=args.num_val, num_test=args.num_test, max_length=args.max_length,
        word_count_threshold=args.word_count_threshold,
        vocab_from_all_splits=args.vocab_from_all_splits,
        image_size=args.image_size, image_format=args.image_format,
        shard_size=args.shard_size, num_workers=args.num_workers,
        max_pixels=args.max_pixels, progress=not args.no_progress,
        extra_info={"source": source, "notes": notes}, force=args.force)
  except (datasets.DataError, ValueError, OSError) as e:
    print(f"captionjax prepro: error: {e}", file=sys.stderr)
    return 2
  finally:
    if spill_dir:
      shutil.rmtree(spill_dir, ignore_errors=True)
  print(json.dumps({k: info[k] for k in ("splits", "num_captions", "vocab_size")}))
  return 0


def assign_splits(items: list[dict], num_val: int, num_test: int) -> list[str]:
  """Each item's split: its own 'split' field, else NeuralTalk2's rule.

  NeuralTalk2 shuffles the images with seed 123; the first `num_val` are val,
  the next `num_test` test, the rest train.
  """
  if all("split" in it for it in items):
    return [str(it["split"]) for it in items]
  if any("split" in it for it in items):
    raise datasets.DataError("some items have a 'split' field and some do not")
  order = list(range(len(items)))
  random.Random(SPLIT_SEED).shuffle(order)
  splits = ["train"] * len(items)
  for rank, i in enumerate(order):
    if rank < num_val:
      splits[i] = "val"
    elif rank < num_val + num_test:
      splits[i] = "test"
  return splits


def fingerprint(items: list[dict], settings: dict, images_root: str) -> str | None:
  """A hash of everything the output depends on, or None when it can't be had.

  It covers the items (paths, captions, tokens, ids, splits, objects), the
  settings and each image file's size and modification time. Items whose
  image comes as bytes or a byte range (TFDS) have no stable file: None.
  """
  h = hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode())
  for it in items:
    if it.get("image_bytes") is not None or it.get("image_range") is not None:
      return None
    try:
      st = os.stat(os.path.join(images_root, it["file_path"]))
      stamp = [st.st_size, st.st_mtime_ns]
    except OSError as e:
      stamp = [type(e).__name__]
    rec = [it["file_path"], it.get("captions"), it.get("tokens"), it.get("id"),
           it.get("split"), it.get("objects"), stamp]
    h.update(json.dumps(rec, ensure_ascii=False).encode())
    h.update(b"\0")
  return h.hexdigest()


def _up_to_date(output_dir: str, fp: str | None) -> dict | None:
  """The existing output's info when it was made from the same fingerprint."""
  if fp is None:
    return None
  try:
    info = records.load_info(output_dir)
  except (OSError, ValueError):
    return None
  if info.get("fingerprint") != fp:
    return None
  for split in info.get("splits", {}):
    if not records.split_files(output_dir, split) or not os.path.exists(
        records.annotations_path(output_dir, split)):
      return None
  if not os.path.exists(os.path.join(output_dir, records.VOCAB_FILE)):
    return None
  return info


def prepro(items: list[dict], output_dir: str, *, images_root: str = "",
           num_val: int = 5000, num_test: int = 5000, max_length: int = 16,
           word_count_threshold: int = 5, vocab_from_all_splits: bool = False,
           image_size: int = 256, image_format: str = "jpeg",
           shard_size: int = DEFAULT_SHARD_SIZE, num_workers: int = 1,
           max_pixels: int = images.MAX_PIXELS, progress: bool = True,
           extra_info: dict | None = None, force: bool = False) -> dict:
  """Preprocesses `items` (see `captionjax.datasets`) into `output_dir`.

  When `output_dir` already holds the output of the same items, image files
  and settings (see `fingerprint`), nothing is redone unless `force`.

  Returns the dataset_info dict that is also written to disk.
  """
  if not items:
    raise datasets.DataError("the data set has no items")
  if max_length < 1 or shard_size < 1:
    raise ValueError("max_length and shard_size must be positive")
  if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
    raise ValueError(f"--image_size={image_size}: must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
  if num_val < 0 or num_test < 0 or word_count_threshold < 0:
    raise ValueError(f"--num_val={num_val}, --num_test={num_test}, --word_count_threshold="
                     f"{word_count_threshold}: none may be negative")
  t0 = time.time()
  splits = assign_splits(items, num_val, num_test)
  ids = image_ids(items)
  settings = {
      "format_version": records.FORMAT_VERSION, "images_root": images_root,
      "num_val": num_val, "num_test": num_test, "max_length": max_length,
      "word_count_threshold": word_count_threshold,
      "vocab_from_all_splits": vocab_from_all_splits, "image_size": image_size,
      "image_format": image_format, "shard_size": shard_size, "max_pixels": max_pixels,
      "extra_info": extra_info or {}}
  fp = fingerprint(items, settings, images_root)
  old = None if force else _up_to_date(output_dir, fp)
  if old is not None:
    print(f"prepro: {output_dir} is up to date (same inputs, image files and settings); "
          f"nothing to do (--force redoes it)", file=sys.stderr)
    return old

  parent = os.path.dirname(os.path.abspath(output_dir))
  os.makedirs(parent or ".", exist_ok=True)
  _remove_abandoned_work(parent)
  work = tempfile.mkdtemp(prefix=f".prepro-{os.getpid()}-", dir=parent)
  try:
    images_bin = os.path.join(work, "images.bin")
    kept, skipped = decode_images(
        items, images_bin, images_root=images_root, image_size=image_size,
        image_format=image_format, max_pixels=max_pixels, num_workers=num_workers,
        progress=progress)
    tokens, vocab = build_vocabulary(items, kept, splits, word_count_threshold,
                                     vocab_from_all_splits)
    if len(vocab) < MIN_USEFUL_VOCAB:
      print(f"prepro: warning: --word_count_threshold={word_count_threshold} leaves a "
            f"vocabulary of {len(vocab)} word(s); most words will be UNK", file=sys.stderr)
    counts = _split_counts(splits, kept)
    out = os.path.join(work, "out")
    os.makedirs(out)
    refs, stats = write_records(
        images_bin, out, items=items, ids=ids, splits=splits, tokens=tokens, vocab=vocab,
        counts=counts, max_length=max_length, shard_size=shard_size, progress=progress)
    info = {
        "format_version": records.FORMAT_VERSION, "splits": counts,
        "num_images": sum(counts.values()), "num_captions": stats.captions,
        "vocab_size": len(vocab), "max_length": max_length, "image_size": image_size,
        "image_format": image_format, "word_count_threshold": word_count_threshold,
        "unk_fraction": stats.unknown / max(stats.tokens, 1),
        "caption_length_histogram": stats.histogram, "skipped": skipped}
    summary = _summary(info, len(items))  # before extra_info: its keys may shadow these
    info.update(extra_info or {})
    if fp is not None:
      info["fingerprint"] = fp
    _write_metadata(out, refs, vocab, info)
    _swap_in(out, output_dir)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  _report(summary, time.time() - t0, len(items), skipped, counts, num_val, num_test)
  return info


def image_ids(items: list[dict]) -> list:
  """Each item's image id (its "id", else its index); a DataError names a repeated one."""
  ids = [it.get("id", i) for i, it in enumerate(items)]
  if len(set(ids)) != len(ids):
    first = {}
    for i, image_id in enumerate(ids):
      if image_id in first:
        a, b = (items[j].get("file_path", f"item {j}") for j in (first[image_id], i))
        raise datasets.DataError(f"image id {image_id} is used twice ({a} and {b})")
      first[image_id] = i
  return ids


# ---------------------------------------------------------------- pass 1: images


def _process_image(job):
  """Pass-1 worker: (index, source, ...) -> (index, encoded or None, reason).

  The source is a path, the image's bytes, or (path, offset, length).
  """
  index, source, size, fmt, max_pixels = job
  try:
    if isinstance(source, tuple):
      path, offset, length = source
      with open(path, "rb") as f:
        f.seek(offset)
        source = f.read(length)
    img = images.load_pil(source, size, max_pixels=max_pixels)
    return index, images.encode_image(img, fmt), ""
  except images.ImageError as e:
    return index, None, str(e)
  except OSError as e:
    return index, None, f"cannot read ({e.strerror or e})"


def _image_source(item: dict, images_root: str):
  if item.get("image_bytes") is not None:
    return item["image_bytes"]
  if item.get("image_range") is not None:
    return tuple(item["image_range"])
  return os.path.join(images_root, item["file_path"])


def _item_name(item: dict, index: int) -> str:
  return item.get("file_path", f"item {index}")


def decode_images(items: list[dict], path: str, *, images_root: str, image_size: int,
                  image_format: str, max_pixels: int, num_workers: int,
                  progress: bool) -> tuple[list[bool], list[dict]]:
  """Pass 1: decodes, resizes and encodes every image into the file `path`.

  The file holds, for each kept image in the items' order, its index and
  byte count (`_LEN`) then its encoded bytes. Returns which items were kept
  and the skipped ones ({"file", "reason"}).
  """
  jobs = ((i, _image_source(it, images_root), image_size, image_format, max_pixels)
          for i, it in enumerate(items))
  skipped, kept = [], [False] * len(items)
  results = _decode_all(jobs, items, num_workers)
  with open(path, "wb") as tmp, contextlib.closing(results):
    for index, data, reason in tqdm(results, total=len(items), desc="images",
                                    disable=not progress, unit="img"):
      if data is None:
        skipped.append({"file": _item_name(items[index], index), "reason": reason})
        continue
      kept[index] = True
      tmp.write(_LEN.pack(index, len(data)))
      tmp.write(data)
  return kept, skipped


def _decode_all(jobs, items: list[dict], num_workers: int):
  """`_process_image` over the jobs, in order: in this process, or in a pool
  of `num_workers` processes that survives a worker killed by the OS.

  A job whose worker dies is named on stderr and retried once in a fresh
  worker; when that one dies too, the image is skipped with the reason.
  """
  if num_workers <= 1:
    yield from map(_process_image, jobs)
    return

  def on_death(index, job, died, retrying):
    del job
    then = ("retrying it in a fresh worker" if retrying else
            "skipping it (the other images go on)")
    tqdm.write(f"prepro: {_item_name(items[index], index)}: the worker decoding it "
               f"{pool.describe_exit(died.exitcode)}; {then}", file=sys.stderr)

  results = pool.imap(_process_image, jobs, num_workers, retries=1, on_death=on_death)
  with contextlib.closing(results):
    for i, result in enumerate(results):
      if isinstance(result, pool.Died):
        result = (i, None, f"the worker decoding it died {result.deaths} times (the last "
                           f"{pool.describe_exit(result.exitcode)})")
      yield result


# ---------------------------------------------------------------- the vocabulary


def _token_lists(item: dict) -> list[list[str]]:
  if item.get("tokens") is not None:
    return [[str(w).lower() for w in t] for t in item["tokens"]]
  return [vocab_lib.tokenize(c) for c in item["captions"]]


def build_vocabulary(items: list[dict], kept: list[bool], splits: list[str],
                     word_count_threshold: int, from_all_splits: bool):
  """(each item's token lists, [] when skipped; the Vocabulary of the kept
  training images' captions, or of every split's with `from_all_splits`)."""
  tokens = [_token_lists(it) if kept[i] else [] for i, it in enumerate(items)]
  counted = (t for i, ts in enumerate(tokens)
             if from_all_splits or splits[i] == "train" for t in ts)
  return tokens, vocab_lib.Vocabulary(vocab_lib.build_vocab(counted, word_count_threshold))


def _split_counts(splits: list[str], kept: list[bool]) -> dict[str, int]:
  """Kept images per split, splits in sorted order."""
  names = sorted({s for s, k in zip(splits, kept) if k})
  return {s: sum(1 for sp, k in zip(splits, kept) if k and sp == s) for s in names}


# ---------------------------------------------------------------- pass 2: records


def _read_images(path: str):
  """(index, encoded bytes) of every image pass 1 kept, in order."""
  with open(path, "rb") as f:
    while True:
      head = f.read(_LEN.size)
      if not head:
        return
      index, n = _LEN.unpack(head)
      yield index, f.read(n)


class _Shards:
  """Each split's record shards in a folder, `shard_size` records each,
  opened in turn as the split's records come."""

  def __init__(self, folder: str, counts: dict[str, int], shard_size: int):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._writer = tf.io.TFRecordWriter
    self.folder, self.counts, self.shard_size = folder, counts, shard_size
    self.written = {s: 0 for s in counts}
    self.current = {}  # split -> (shard index, its writer)

  def write(self, split: str, record: bytes):
    shard = self.written[split] // self.shard_size
    if split not in self.current or self.current[split][0] != shard:
      if split in self.current:
        self.current.pop(split)[1].close()
      shards = -(-self.counts[split] // self.shard_size)
      name = records.shard_name(split, shard, shards)
      self.current[split] = (shard, self._writer(os.path.join(self.folder, name)))
    self.current[split][1].write(record)
    self.written[split] += 1

  def close(self):
    for _, w in self.current.values():
      w.close()
    self.current.clear()


@dataclasses.dataclass
class _CaptionStats:
  """Counts over the encoded captions of the records."""
  max_length: int
  captions: int = 0
  tokens: int = 0
  unknown: int = 0
  histogram: list = dataclasses.field(default_factory=list)  # captions of each length

  def __post_init__(self):
    self.histogram = [0] * (self.max_length + 1)  # lengths 0 .. max_length

  def add(self, caption: list[int], unk_id: int):
    self.captions += 1
    self.tokens += len(caption)
    self.unknown += sum(1 for w in caption if w == unk_id)
    self.histogram[len(caption)] += 1


def write_records(images_bin: str, out: str, *, items: list[dict], ids: list,
                  splits: list[str], tokens: list, vocab, counts: dict[str, int],
                  max_length: int, shard_size: int, progress: bool):
  """Pass 2: every image pass 1 kept -> one record in its split's shards.

  Returns the COCO-format references of each split ({split: (images,
  annotations)}) and the captions' statistics.
  """
  shards = _Shards(out, counts, shard_size)
  refs = {s: ([], []) for s in counts}
  stats = _CaptionStats(max_length)
  bar = tqdm(total=sum(counts.values()), desc="records", disable=not progress, unit="img")
  try:
    with bar:
      for index, data in _read_images(images_bin):
        it, split = items[index], splits[index]
        caps = [vocab.encode(t, max_length) for t in tokens[index] if t] or [[]]
        for c in caps:
          stats.add(c, vocab.unk_id)
        name = it.get("file_path", f"item-{index}")
        ex = records.make_example(data, ids[index], name, caps, max_length, it.get("objects"))
        shards.write(split, ex.SerializeToString(deterministic=True))  # map keys sorted
        bar.update(1)
        _add_references(refs[split], it, ids[index], name)
  finally:
    shards.close()
  return refs, stats


def _add_references(refs: tuple[list, list], item: dict, image_id, name: str):
  """Appends an image and its raw captions to a split's COCO-format references."""
  imgs, anns = refs
  img = {"id": image_id, "file_name": name}
  if item.get("objects") is not None:
    img["objects"] = item["objects"]
  imgs.append(img)
  raw = item.get("captions") or [" ".join(t) for t in item.get("tokens") or []]
  for c in raw:
    anns.append({"image_id": image_id, "id": len(anns), "caption": c})


def _write_metadata(out: str, refs: dict, vocab, info: dict):
  """The references of each split, the vocabulary and dataset_info.json."""
  for split, (imgs, anns) in refs.items():
    with open(records.annotations_path(out, split), "w", encoding="utf-8") as f:
      f.write(json.dumps({"images": imgs, "annotations": anns}, ensure_ascii=False))
  vocab.save(os.path.join(out, records.VOCAB_FILE))
  with open(os.path.join(out, records.INFO_FILE), "w", encoding="utf-8") as f:
    json.dump(info, f, ensure_ascii=False, indent=1)


# ---------------------------------------------------------------- the output


def _swap_in(out: str, output_dir: str):
  """Replaces the output directory's prepro files by those of `out`.

  dataset_info.json goes first and comes back last: a crash in between leaves
  no dataset_info.json, so the half-swapped folder is never taken for a
  finished one (the next run redoes it).
  """
  os.makedirs(output_dir, exist_ok=True)
  info = os.path.join(output_dir, records.INFO_FILE)
  if os.path.exists(info):
    os.remove(info)
  for old in os.listdir(output_dir):
    if old.endswith(".tfrecord") or old.startswith("annotations_") or old == records.VOCAB_FILE:
      os.remove(os.path.join(output_dir, old))
  for name in sorted(os.listdir(out), key=lambda n: n == records.INFO_FILE):
    os.replace(os.path.join(out, name), os.path.join(output_dir, name))


def _remove_abandoned_work(parent: str) -> None:
  """Removes `.prepro-PID-*` work folders of runs that are gone (killed by the OS, say)."""
  for name in os.listdir(parent):
    parts = name.split("-")
    if name.startswith(".prepro-") and len(parts) > 2 and parts[1].isdigit():
      try:
        os.kill(int(parts[1]), 0)  # that process still runs: its folder stays
      except ProcessLookupError:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
      except OSError:
        pass


def _summary(info: dict, num_items: int) -> str:
  counts = info["splits"]
  return (f"prepro: kept {info['num_images']} of {num_items} images "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())}), "
          f"{info['num_captions']} captions, vocabulary {info['vocab_size']} words, "
          f"skipped {len(info['skipped'])}")


def _report(summary: str, seconds: float, num_items: int, skipped: list[dict],
            counts: dict, num_val: int, num_test: int):
  """The run's summary, each skipped file and a warning without training images."""
  print(f"{summary}, {seconds:.1f} s ({num_items / max(seconds, 1e-9):.0f} images/s)",
        file=sys.stderr)
  for s in skipped:
    print(f"  skipped {s['file']}: {s['reason']}", file=sys.stderr)
  if not counts.get("train"):
    print(f"prepro: warning: no training images (--num_val={num_val} and "
          f"--num_test={num_test} take the first images; items' own 'split' fields win)",
          file=sys.stderr)
