"""`captionjax evaluate`: score a COCO-format results file like coco-caption.

  captionjax evaluate --annotations=ANN.json --results=RES.json \
      [--metrics=bleu,meteor,rouge,cider]

ANN.json is COCO's caption format ({"images": [...], "annotations":
[{"image_id", "caption"}, ...]}); RES.json COCO's results format
([{"image_id", "caption"}, ...]). Only the images in the results are scored.
Prints one JSON object with coco-caption's key names on stdout; notes go to
stderr. Exit status 2 on malformed input.
"""

import argparse
import json
import sys
from typing import Dict, List

EXIT_BAD_INPUT = 2


class InputError(ValueError):
  """A malformed annotations or results file (one-line message)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `evaluate` flags to `parser`."""
  parser.add_argument("--annotations", required=True,
                      help="reference captions, COCO caption-annotation JSON")
  parser.add_argument("--results", required=True,
                      help="candidate captions, COCO results JSON [{image_id, caption}]")
  parser.add_argument("--metrics", default="bleu,meteor,rouge,cider",
                      help="comma-separated subset of bleu,meteor,rouge,cider,spice")


def _load_json(path: str, what: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except OSError as e:
    raise InputError(f"{path}: cannot read {what} file ({e.strerror})") from None
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: {what} file is not valid JSON ({e.msg}, line {e.lineno})") from None


def _caption_entry(entry, path: str, index: int, what: str):
  if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
    raise InputError(f"{path}: {what}[{index}] needs 'image_id' and 'caption'")
  if not isinstance(entry["caption"], str):
    raise InputError(f"{path}: {what}[{index}].caption is not a string")
  image_id = entry["image_id"]
  if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
    raise InputError(f"{path}: {what}[{index}].image_id is a {type(image_id).__name__}; "
                     "it must be a number or a string")
  return image_id, entry["caption"]


def load_annotations(path: str) -> Dict[object, List[str]]:
  """Reads COCO caption annotations into {image_id: [caption, ...]}."""
  data = _load_json(path, "annotations")
  if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
    raise InputError(f"{path}: annotations file needs an 'annotations' list (COCO format)")
  gts: Dict[object, List[str]] = {}
  for i, entry in enumerate(data["annotations"]):
    image_id, caption = _caption_entry(entry, path, i, "annotations")
    gts.setdefault(image_id, []).append(caption)
  return gts


def load_results(path: str) -> Dict[object, str]:
  """Reads COCO results into {image_id: caption}; the first caption of an id wins."""
  return results_from_records(_load_json(path, "results"), path)


def results_from_records(data, path: str = "results") -> Dict[object, str]:
  """COCO results [{image_id, caption}, ...] -> {image_id: caption}; the first of an id wins.

  `path` names the source in errors and warnings.
  """
  if not isinstance(data, list):
    raise InputError(f"{path}: results file must be a JSON list of {{image_id, caption}}")
  res: Dict[object, str] = {}
  duplicates = 0
  for i, entry in enumerate(data):
    image_id, caption = _caption_entry(entry, path, i, "results")
    if image_id in res:
      duplicates += 1
      continue
    res[image_id] = caption
  if duplicates:
    print(f"warning: {path}: {duplicates} duplicate image_id(s) in results; "
          "keeping the first caption of each", file=sys.stderr)
  if not res:
    raise InputError(f"{path}: results file holds no captions")
  return res


def run(args: argparse.Namespace) -> int:
  """Runs `captionjax evaluate`; returns the exit status."""
  from captionjax import metrics  # pylint: disable=import-outside-toplevel
  try:
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not names:
      raise InputError(f"--metrics={args.metrics!r}: names no metric "
                       "(a comma-separated subset of bleu,meteor,rouge,cider,spice)")
    metrics._check_metrics(names)  # pylint: disable=protected-access
    gts = load_annotations(args.annotations)
    res = load_results(args.results)
    missing = [k for k in res if k not in gts]
    if missing:
      raise InputError(f"{args.results}: {len(missing)} result image_id(s) not in "
                       f"{args.annotations}, e.g. {missing[0]!r}")
    empty = [k for k in res if not any(c.strip() for c in gts[k])]
    if empty:
      raise InputError(f"{args.annotations}: image_id {empty[0]!r} has only empty reference "
                       f"captions ({len(empty)} such images); CIDEr needs words to compare")
  except (InputError, ValueError) as e:
    print(f"captionjax evaluate: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(f"scoring {len(res)} images ({sum(len(gts[k]) for k in res)} references)",
        file=sys.stderr)
  from captionjax import api  # pylint: disable=import-outside-toplevel
  scores = api.evaluate(gts, res, metrics=names)
  print(json.dumps(scores))
  return 0
