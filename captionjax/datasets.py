"""Readers that turn captioning data sets into prepro items.

An item is a dict:
  file_path: str, the image path relative to the images root (or absolute);
  captions: list[str], raw caption text;
  tokens: optional list[list[str]], pre-tokenized captions (used when present);
  id: optional int, the image id (default: the item's index);
  split: optional str ("train", "val", "test", or any other name);
  objects: optional, any JSON value describing the image's contents;
  image_bytes: optional bytes, the encoded image when there is no file.
"""

import json


class DataError(ValueError):
  """Malformed input data; str(e) names the file and the field."""


def _check_item(item, where: str) -> dict:
  if not isinstance(item, dict):
    raise DataError(f"{where}: expected an object, got {type(item).__name__}")
  if "file_path" not in item and "image_bytes" not in item:
    raise DataError(f"{where}: missing field 'file_path'")
  caps = item.get("captions")
  if caps is None and item.get("tokens") is None:
    raise DataError(f"{where}: missing field 'captions'")
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
