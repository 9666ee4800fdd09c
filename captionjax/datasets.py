"""Readers that turn captioning data sets into prepro items.

Layouts read here:
  raw JSON        NeuralTalk2's `[{"file_path", "captions", "id"?}]`;
  Karpathy JSON   `dataset_{coco,flickr8k,flickr30k}.json` (Karpathy's splits);
  Flickr token    `Flickr8k.token.txt` / Flickr30k's `results_20130124.token`
                  (`IMAGE.jpg#N<TAB>caption`) with Flickr8k's split lists;
  captions CSV    `image,caption` rows, one row per caption (Kaggle's
                  Flickr8k `captions.txt`, Flickr30k `results.csv`, your own);
  TFDS            `coco_captions` (or any builder with `image`, `image/id`,
                  `image/filename`, `captions/text`), read offline.

An item is a dict:
  file_path: str, the image path relative to the images root (or absolute);
  captions: list[str], raw caption text;
  tokens: optional list[list[str]], pre-tokenized captions (used when present);
  id: optional int, the image id (default: the item's index);
  split: optional str ("train", "val", "test", or any other name);
  objects: optional, any JSON value describing the image's contents;
  image_bytes: optional bytes, the encoded image when there is no file;
  image_range: optional (path, offset, length), the encoded image is that byte
    range of a file (a spill file of images that came without a file).

Readers append one-line notes about what they left out to `notes` (a list,
when given); `captionjax prepro` prints them and keeps them in
`dataset_info.json`.
"""

import collections
import csv
import io
import json
import os
import re

from captionjax import vocab as vocab_lib


class DataError(ValueError):
  """Malformed input data; str(e) names the file and the field."""


def _check_item(item, where: str) -> dict:
  if not isinstance(item, dict):
    raise DataError(f"{where}: expected an object, got {type(item).__name__}")
  if "file_path" not in item and "image_bytes" not in item:
    raise DataError(f"{where}: missing field 'file_path'")
  if "file_path" in item and not isinstance(item["file_path"], str):
    raise DataError(f"{where}: field 'file_path' must be a string, got {item['file_path']!r}")
  caps = item.get("captions")
  if caps is None and item.get("tokens") is None:
    raise DataError(f"{where}: missing field 'captions'")
  toks = item.get("tokens")
  if toks is not None and not (isinstance(toks, list) and all(
      isinstance(t, list) and all(isinstance(w, str) for w in t) for t in toks)):
    raise DataError(f"{where}: field 'tokens' must be a list of lists of strings")
  if caps is not None:
    if isinstance(caps, str):
      caps = [caps]
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
      raise DataError(f"{where}: field 'captions' must be a list of strings")
    item = dict(item, captions=caps)
  if "id" in item and not isinstance(item["id"], int):
    raise DataError(f"{where}: field 'id' must be an integer, got {item['id']!r}")
  return item


def read_raw_json(path: str) -> list[dict]:
  """NeuralTalk2's raw format: `[{"file_path", "captions", "id"?}, ...]`."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list of {{file_path, captions}} objects")
  return [_check_item(it, f"{path}: item {i}") for i, it in enumerate(data)]


def _read_text(path: str, what: str) -> str:
  """A UTF-8 text file (a byte-order mark is dropped), with clear errors."""
  try:
    with open(path, "rb") as f:
      return f.read().decode("utf-8-sig")
  except FileNotFoundError:
    raise DataError(f"{path}: no such {what}") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  except UnicodeDecodeError as e:
    line = e.object[:e.start].count(b"\n") + 1
    raise DataError(f"{path}: line {line}: not UTF-8 text ({e.reason})") from None


def _note(notes, text: str) -> None:
  if notes is not None:
    notes.append(text)


# ------------------------------------------------------------- Karpathy JSON

KARPATHY_SPLITS = ("train", "val", "test", "restval")
RESTVAL_CHOICES = ("train", "keep", "drop")  # fold into train, own split, leave out


def read_karpathy_json(path: str, restval: str = "train", notes=None) -> list[dict]:
  """Karpathy's split files: `{"images": [{"filename", "filepath"?, "split",
  "sentences": [{"tokens", "raw"}], "cocoid"?, "imgid"?}]}`.

  Args:
    path: `dataset_coco.json`, `dataset_flickr8k.json` or `dataset_flickr30k.json`.
    restval: what becomes of COCO's "restval" images: "train" (folded into
      train, the usual practice), "keep" (a split of its own) or "drop".
    notes: a list the reader appends notes to.

  Returns:
    Items whose `file_path` is `filepath/filename` (COCO: `val2014/...jpg`),
    whose `tokens` are the sentences' tokens (NeuralTalk2's rule on `raw`
    where a sentence has none) and whose `id` is `cocoid`, else `imgid`.
  """
  if restval not in RESTVAL_CHOICES:
    raise ValueError(f"restval must be one of {RESTVAL_CHOICES}, got {restval!r}")
  text = _read_text(path, "Karpathy split file")
  try:
    data = json.loads(text)
  except ValueError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise DataError(f"{path}: expected an object with an 'images' list (Karpathy's format)")
  items, dropped = [], 0
  for i, im in enumerate(data["images"]):
    where = f"{path}: images[{i}]"
    if not isinstance(im, dict):
      raise DataError(f"{where}: expected an object, got {type(im).__name__}")
    for field in ("filename", "split", "sentences"):
      if field not in im:
        raise DataError(f"{where}: missing field {field!r}")
    if not isinstance(im["sentences"], list):
      raise DataError(f"{where}: field 'sentences' must be a list")
    split = im["split"]
    if split not in KARPATHY_SPLITS:
      raise DataError(f"{where}: field 'split' is {split!r}, expected one of {KARPATHY_SPLITS}")
    if split == "restval":
      if restval == "drop":
        dropped += 1
        continue
      if restval == "train":
        split = "train"
    captions, tokens = [], []
    for j, s in enumerate(im["sentences"]):
      if not isinstance(s, dict) or not (isinstance(s.get("raw"), str)
                                         or isinstance(s.get("tokens"), list)):
        raise DataError(f"{where}: sentences[{j}] needs 'raw' text or a 'tokens' list")
      toks = s.get("tokens")
      if toks is not None and not (isinstance(toks, list) and all(isinstance(w, str) for w in toks)):
        raise DataError(f"{where}: sentences[{j}]: field 'tokens' must be a list of strings")
      raw = s.get("raw")
      if raw is not None and not isinstance(raw, str):
        raise DataError(f"{where}: sentences[{j}]: field 'raw' must be a string")
      captions.append(raw if raw is not None else " ".join(toks))
      tokens.append(toks if toks is not None else vocab_lib.tokenize(raw))
    item = {"file_path": os.path.join(im.get("filepath") or "", im["filename"]),
            "captions": captions, "tokens": tokens, "split": split}
    for key in ("cocoid", "imgid"):
      if key in im:
        if not isinstance(im[key], int):
          raise DataError(f"{where}: field {key!r} must be an integer, got {im[key]!r}")
        item["id"] = im[key]
        break
    items.append(item)
  if dropped:
    _note(notes, f"{path}: {dropped} restval images left out (--restval=drop)")
  return items


# ---------------------------------------------------------- Flickr token file

# Flickr8k's split lists, looked for beside the token file.
FLICKR8K_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                  "test": "Flickr_8k.testImages.txt"}
_TOKEN_LINE = re.compile(r"^(?P<image>.+?)#(?P<n>\d+)\s+(?P<caption>.*)$")


def read_flickr_token(path: str, split_lists: dict | None = None, notes=None) -> list[dict]:
  """Flickr's caption file: one `IMAGE.jpg#N<TAB>caption` line per caption.

  Reads Flickr8k's `Flickr8k.token.txt` (and `Flickr8k.lemma.token.txt`) and
  Flickr30k's `results_20130124.token`. A few lines of the real Flickr8k
  file separate the key from the caption with a space, not a tab; both work.

  Args:
    path: the token file.
    split_lists: {split: path of a file with one image name per line}. None:
      Flickr8k's `Flickr_8k.{train,dev,test}Images.txt` beside the token
      file, where they exist ("dev" is the val split). When there are split
      lists, images in none of them are left out (and counted in `notes`);
      when there are none, items carry no split (prepro's --num_val/--num_test).
    notes: a list the reader appends notes to.
  """
  text = _read_text(path, "caption token file")
  captions = collections.OrderedDict()
  for ln, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    m = _TOKEN_LINE.match(line.strip())
    if not m:
      raise DataError(f"{path}: line {ln}: expected 'IMAGE#N<TAB>caption', got {line[:60]!r}")
    captions.setdefault(m["image"].strip(), []).append(m["caption"].strip())
  if not captions:
    raise DataError(f"{path}: no captions")
  if split_lists is None:
    here = os.path.dirname(os.path.abspath(path))
    split_lists = {s: os.path.join(here, f) for s, f in FLICKR8K_LISTS.items()
                   if os.path.exists(os.path.join(here, f))}
  split_of = {}
  for split, list_path in split_lists.items():
    for ln, line in enumerate(_read_text(list_path, "split list").splitlines(), 1):
      name = line.strip()
      if not name:
        continue
      if split_of.get(name, split) != split:
        raise DataError(f"{list_path}: line {ln}: {name} is also in the {split_of[name]} list")
      split_of[name] = split
  items = []
  for name, caps in captions.items():
    item = {"file_path": name, "captions": caps, "id": len(items)}
    if split_of:
      if name not in split_of:
        continue
      item["split"] = split_of[name]
    items.append(item)
  if split_of:
    unlisted = len(captions) - len(items)
    if unlisted:
      _note(notes, f"{path}: {unlisted} captioned images are in no split list; left out")
    uncaptioned = sum(1 for n in split_of if n not in captions)
    if uncaptioned:
      _note(notes, f"{path}: {uncaptioned} images of the split lists have no captions; left out")
  return items


# ---------------------------------------------------------------- captions CSV

CSV_IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name", "file_path",
                     "image_path", "image_file", "path", "file")
CSV_CAPTION_COLUMNS = ("caption", "comment", "text", "sentence", "description")


def read_captions_csv(path: str, notes=None) -> list[dict]:
  """A captions table: a header, then one `image,caption` row per caption.

  The image column may be called any of `CSV_IMAGE_COLUMNS`, the caption
  column any of `CSV_CAPTION_COLUMNS`; optional `split` and `id` (or
  `image_id`) columns give each image's split and id. Comma, tab, semicolon
  and `|` separators are recognized (Kaggle's Flickr30k `results.csv` uses
  `| `); fields may be quoted; text is UTF-8. Rows of one image need not be
  adjacent; images keep the order of their first row.
  """
  text = _read_text(path, "captions CSV")
  first = text.split("\n", 1)[0]
  delim = max(",\t;|", key=first.count)
  rows = csv.reader(io.StringIO(text), delimiter=delim, skipinitialspace=True)
  try:
    header = [h.strip().lower() for h in next(rows)]
  except StopIteration:
    raise DataError(f"{path}: empty file") from None
  except csv.Error as e:
    raise DataError(f"{path}: line 1: {e}") from None

  def column(names, what, required=True):
    for n in names:
      if n in header:
        return header.index(n)
    if required:
      raise DataError(f"{path}: no {what} column in the header {header} "
                      f"(expected one of: {', '.join(names)})")
    return None

  ci = column(CSV_IMAGE_COLUMNS, "image")
  cc = column(CSV_CAPTION_COLUMNS, "caption")
  cs = column(("split",), "split", required=False)
  cid = column(("id", "image_id"), "id", required=False)
  by_image = collections.OrderedDict()
  empty = 0
  try:
    for row in rows:
      ln = rows.line_num
      if not any(c.strip() for c in row):
        continue
      if len(row) <= max(c for c in (ci, cc, cs, cid) if c is not None):
        raise DataError(f"{path}: line {ln}: expected {len(header)} fields, got {len(row)}")
      name, cap = row[ci].strip(), row[cc].strip()
      if not name:
        raise DataError(f"{path}: line {ln}: empty image name")
      item = by_image.get(name)
      if item is None:
        item = by_image[name] = {"file_path": name, "captions": []}
        if cs is not None:
          item["split"] = row[cs].strip()
        if cid is not None:
          try:
            item["id"] = int(row[cid])
          except ValueError:
            raise DataError(f"{path}: line {ln}: id {row[cid]!r} is not an integer") from None
      elif cs is not None and item["split"] != row[cs].strip():
        raise DataError(f"{path}: line {ln}: {name} is in split {row[cs].strip()!r} "
                        f"here but {item['split']!r} on an earlier line")
      if cap:
        item["captions"].append(cap)
      else:
        empty += 1
  except csv.Error as e:
    raise DataError(f"{path}: line {rows.line_num}: {e}") from None
  if not by_image:
    raise DataError(f"{path}: no caption rows")
  if empty:
    _note(notes, f"{path}: {empty} rows with an empty caption ignored")
  return list(by_image.values())


# ----------------------------------------------------------------------- TFDS

TFDS_SPLITS = ("train", "restval", "val", "test")  # coco_captions' (Karpathy's) splits


def read_tfds(name: str, data_dir: str, spill_path: str, restval: str = "train",
              splits=None, notes=None, progress: bool = False) -> list[dict]:
  """A prepared TFDS captioning data set (`coco_captions`), read offline.

  Nothing is downloaded and no cloud bucket is asked (`download=False`,
  `try_gcs=False`): the data must already be prepared in `data_dir`. The
  encoded images (not decoded: `SkipDecoding`) are copied to `spill_path`
  and the items point at their byte ranges, so a large set is not held in
  memory.

  Args:
    name: the builder name, e.g. "coco_captions".
    data_dir: the TFDS data directory.
    spill_path: a file the encoded images are written to.
    restval: what becomes of a "restval" split: "train", "keep" or "drop".
    splits: the splits to read; default: the prepared ones (the Karpathy
      splits when the data set does not say).
    notes: a list the reader appends notes to.
    progress: show a progress bar per split.
  """
  if restval not in RESTVAL_CHOICES:
    raise ValueError(f"restval must be one of {RESTVAL_CHOICES}, got {restval!r}")
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except Exception as e:  # DatasetNotFoundError, bad config names, ...
    raise DataError(f"--tfds={name}: {str(e).splitlines()[0]}") from None
  feats = builder.info.features
  if "image" not in feats or "captions" not in feats or "text" not in feats["captions"].feature:
    raise DataError(f"--tfds={name}: the data set has no 'image' and 'captions/text' "
                    f"features (it has {sorted(feats)})")
  if splits is None:
    splits = [s for s in TFDS_SPLITS if s in builder.info.splits] or list(
        builder.info.splits) or list(TFDS_SPLITS)
  items, dropped = [], 0
  with open(spill_path, "wb") as spill:
    for split in splits:
      if split == "restval" and restval == "drop":
        dropped += builder.info.splits[split].num_examples if split in builder.info.splits else 0
        continue
      try:
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False, try_gcs=False,
                       decoders={"image": tfds.decode.SkipDecoding()})
      except (AssertionError, ValueError, OSError) as e:
        raise DataError(f"--tfds={name} --tfds_data_dir={data_dir}: split {split!r} is not "
                        f"prepared there ({str(e).splitlines()[0]})") from None
      out_split = "train" if split == "restval" and restval == "train" else split
      total = builder.info.splits[split].num_examples if split in builder.info.splits else None
      for ex in tqdm(ds.as_numpy_iterator(), total=total, desc=f"tfds {split}", unit="img",
                     disable=not progress):
        data = ex["image"]
        offset = spill.tell()
        spill.write(data)
        index = len(items)
        fname = ex.get("image/filename", b"")
        item = {"file_path": fname.decode("utf-8") if fname else f"{split}/{index}",
                "captions": [t.decode("utf-8") for t in ex["captions"]["text"]],
                "image_range": (spill_path, offset, len(data)), "split": out_split}
        if "image/id" in ex:
          item["id"] = int(ex["image/id"])
        items.append(item)
  if dropped:
    _note(notes, f"--tfds={name}: {dropped} restval images left out (--restval=drop)")
  if not items:
    raise DataError(f"--tfds={name}: no examples in splits {list(splits)}")
  return items
