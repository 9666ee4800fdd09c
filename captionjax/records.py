"""The on-disk record format written by `captionjax prepro`.

A prepro output directory holds:
  vocab.json             {"ix_to_word": {"1": word, ...}} (id 0 is END/pad)
  dataset_info.json      splits, counts, vocabulary size, skipped files, ...
  annotations_SPLIT.json COCO-format references ({"images", "annotations"})
  SPLIT-IIIII-of-NNNNN.tfrecord  tf.train.Example records, one per image:

  | feature        | type        | content                                     |
  |----------------|-------------|---------------------------------------------|
  | image          | bytes       | the image, resized to image_size, as JPEG/PNG|
  | image_id       | int64       | the image's id (input "id", else its index) |
  | file_name      | bytes       | path relative to the images root (UTF-8)    |
  | captions       | int64 list  | num_captions * max_length word ids, 0-padded|
  | num_captions   | int64       | number of captions                          |
  | objects        | bytes       | JSON of the image's object list, or empty   |

Captions are cut at `max_length` words; the input pipeline adds START/END.
"""

import glob
import json
import os

FORMAT_VERSION = 1
INFO_FILE = "dataset_info.json"
VOCAB_FILE = "vocab.json"


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def split_files(data_dir: str, split: str) -> list[str]:
  """The record shards of one split, in order."""
  return sorted(glob.glob(os.path.join(data_dir, f"{split}-*-of-*.tfrecord")))


def annotations_path(data_dir: str, split: str) -> str:
  return os.path.join(data_dir, f"annotations_{split}.json")


def load_info(data_dir: str) -> dict:
  """Reads `dataset_info.json`, with a clear error when it is not there."""
  path = os.path.join(data_dir, INFO_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path}: no such file; is {data_dir!r} the output of `captionjax prepro`?")
  try:
    with open(path, encoding="utf-8") as f:
      info = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: unsupported format_version {info.get('format_version')}")
  return info


def make_example(image_bytes: bytes, image_id: int, file_name: str,
                 captions: list[list[int]], max_length: int, objects=None):
  """One tf.train.Example (imports TensorFlow lazily)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  flat = []
  for c in captions:
    flat.extend(list(c[:max_length]) + [0] * (max_length - len(c[:max_length])))

  def b(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

  def i(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=v))

  feats = {
      "image": b(image_bytes),
      "image_id": i([int(image_id)]),
      "file_name": b(file_name.encode("utf-8")),
      "captions": i(flat),
      "num_captions": i([len(captions)]),
      "objects": b(json.dumps(objects).encode("utf-8") if objects is not None else b""),
  }
  return tf.train.Example(features=tf.train.Features(feature=feats))


def feature_spec():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {
      "image": tf.io.FixedLenFeature([], tf.string),
      "image_id": tf.io.FixedLenFeature([], tf.int64),
      "file_name": tf.io.FixedLenFeature([], tf.string),
      "captions": tf.io.VarLenFeature(tf.int64),
      "num_captions": tf.io.FixedLenFeature([], tf.int64),
      "objects": tf.io.FixedLenFeature([], tf.string, default_value=b""),
  }
