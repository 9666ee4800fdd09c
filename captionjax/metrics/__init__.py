"""Caption metrics as the coco-caption toolkit computes them, Java-free where possible.

`score(gts, res)` gives coco-caption's numbers (key names `Bleu_1`..`Bleu_4`,
`METEOR`, `ROUGE_L`, `CIDEr`, `SPICE`) from raw caption strings: tokenization
(a pure-Python copy of coco-caption's PTBTokenizer step), BLEU, ROUGE-L and
CIDEr-D run in Python/numpy; METEOR runs pycocoevalcap's jar when Java is
present; SPICE only when its models are already on disk. `CiderD` scores many
candidates per image at once, e.g. as a training reward.
"""

import sys
from typing import Dict, Hashable, Iterable, List, Mapping, Sequence, Tuple, Union

import numpy as np

from captionjax.metrics import meteor as _meteor
from captionjax.metrics import spice as _spice
from captionjax.metrics.bleu import compute_bleu
from captionjax.metrics.cider import CiderD, compute_cider
from captionjax.metrics.meteor import compute_meteor
from captionjax.metrics.rouge import compute_rouge
from captionjax.metrics.tokenizer import tokenize, tokenize_captions

DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")
ALL_METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
BLEU_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")

__all__ = ["score", "score_per_image", "CiderD", "tokenize", "tokenize_captions",
           "compute_bleu", "compute_rouge", "compute_cider", "compute_meteor",
           "DEFAULT_METRICS", "ALL_METRICS"]


def _prepare(gts: Mapping[Hashable, Sequence[str]],
             res: Mapping[Hashable, Union[str, Sequence[str]]],
             tokenize_: bool) -> Tuple[Dict, Dict]:
  """Checks inputs; returns coco-caption-shaped {key: [str]} dicts over res' keys."""
  missing = [k for k in res if k not in gts]
  if missing:
    raise KeyError(f"res: {len(missing)} image(s) missing from gts, e.g. {missing[0]!r}")
  if not res:
    raise ValueError("res: no captions to score")
  keys = list(res)
  hyps = {}
  for k in keys:
    h = res[k]
    if not isinstance(h, str):
      if len(h) != 1:
        raise ValueError(f"res[{k!r}]: expected one caption, got {len(h)}")
      h = h[0]
    hyps[k] = h
  refs = {}
  for k in keys:
    if isinstance(gts[k], str) or not gts[k]:
      raise ValueError(f"gts[{k!r}]: expected a non-empty list of captions")
    refs[k] = list(gts[k])
  if tokenize_:
    # Like coco-caption: one tokenizer pass over all references, one over results.
    refs = tokenize(refs)
    hyp_list = tokenize_captions([hyps[k] for k in keys])
    hyps = dict(zip(keys, hyp_list))
  return refs, {k: [hyps[k]] for k in keys}


def _check_metrics(metrics: Iterable[str]) -> List[str]:
  names = [m.strip().lower() for m in metrics]
  bad = [m for m in names if m not in ALL_METRICS]
  if bad:
    raise ValueError(f"metrics: unknown {bad[0]!r} (known: {', '.join(ALL_METRICS)})")
  return names


def score_per_image(gts, res, metrics=DEFAULT_METRICS, tokenize: bool = True
                    ) -> Tuple[Dict[str, float], Dict[str, np.ndarray], List[Hashable]]:
  """Corpus and per-image scores.

  Args: as `score`.

  Returns:
    (corpus {name: float}, per_image {name: float64 [num_images]}, image keys
    in the order of the per-image arrays).
  """
  names = _check_metrics(metrics)
  refs, hyps = _prepare(gts, res, tokenize)
  corpus: Dict[str, float] = {}
  per_image: Dict[str, np.ndarray] = {}
  for name in names:
    if name == "bleu":
      c, p = compute_bleu(refs, hyps)
      for key, cs, ps in zip(BLEU_KEYS, c, p):
        corpus[key], per_image[key] = float(cs), ps
    elif name == "rouge":
      corpus["ROUGE_L"], per_image["ROUGE_L"] = compute_rouge(refs, hyps)
    elif name == "cider":
      corpus["CIDEr"], per_image["CIDEr"] = compute_cider(refs, hyps)
    elif name == "meteor":
      why = _meteor.missing_requirement()
      if why:
        print(f"warning: {why}; METEOR not scored", file=sys.stderr)
        continue
      c, p = compute_meteor(refs, hyps)
      corpus["METEOR"], per_image["METEOR"] = c, np.array(p)
    elif name == "spice":
      why = _spice.missing_requirement()
      if why:
        print(f"note: {why}", file=sys.stderr)
        continue
      c, _ = compute_spice_in_key_order(refs, hyps)
      corpus["SPICE"] = c
  return corpus, per_image, list(hyps)


def compute_spice_in_key_order(refs, hyps):
  """SPICE corpus score (per-image scores come back in sorted key order)."""
  return _spice.compute_spice(refs, hyps)


def score(gts: Mapping[Hashable, Sequence[str]],
          res: Mapping[Hashable, Union[str, Sequence[str]]],
          metrics: Sequence[str] = DEFAULT_METRICS,
          tokenize: bool = True) -> Dict[str, float]:
  """Scores captions as coco-caption does, over the images in `res`.

  Args:
    gts: dict image key -> list of raw reference captions (str).
    res: dict image key -> one raw candidate caption (str, or a 1-element list);
      every key must be in `gts`. Only these images are scored.
    metrics: any of "bleu", "meteor", "rouge", "cider", "spice".
    tokenize: run coco-caption's tokenization first (False: captions are
      already tokenized, words separated by spaces).

  Returns:
    dict with coco-caption's key names (`Bleu_1`..`Bleu_4`, `METEOR`,
    `ROUGE_L`, `CIDEr`, `SPICE`); METEOR (no Java) and SPICE (no models) are
    left out with a message on stderr.
  """
  return score_per_image(gts, res, metrics, tokenize)[0]
