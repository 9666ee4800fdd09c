"""BLEU-1..4 as coco-caption computes it (pycocoevalcap `Bleu(4)`).

coco-caption's variant: n-gram counts clipped by the maximum count in any
reference, the *closest* reference length (ties to the shorter one) for the
brevity penalty, and zero counts kept finite by adding `_TINY` to matches and
`_SMALL` to guesses. The corpus score pools counts over all images; the
per-image scores apply the same formula to each image alone.
"""

import collections
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

MAX_N = 4
_TINY = 1e-15  # added to match counts, so a zero count gives ~0, not 0/0
_SMALL = 1e-9  # added to guess counts and lengths to avoid division by zero


def _ngram_counts(words: Sequence[str], n: int) -> collections.Counter:
  """Counts all 1..n-grams of a token list (n-grams as tuples)."""
  counts = collections.Counter()
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      counts[tuple(words[i:i + k])] += 1
  return counts


def _image_stats(hyp: str, refs: Sequence[str], n: int) -> Tuple[int, int, List[int], List[int]]:
  """Sufficient statistics of one image.

  Returns:
    (testlen, reflen, guess [n], correct [n]) where reflen is the length of the
    reference closest to the hypothesis length.
  """
  max_ref = {}
  ref_lens = []
  for ref in refs:
    words = ref.split()
    ref_lens.append(len(words))
    for gram, c in _ngram_counts(words, n).items():
      if c > max_ref.get(gram, 0):
        max_ref[gram] = c
  words = hyp.split()
  testlen = len(words)
  reflen = min((abs(l - testlen), l) for l in ref_lens)[1]
  guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
  correct = [0] * n
  for gram, c in _ngram_counts(words, n).items():
    correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
  return testlen, reflen, guess, correct


def _bleu_from_stats(testlen: float, reflen: float, guess: Sequence[float],
                     correct: Sequence[float], n: int) -> List[float]:
  """BLEU-1..n from pooled statistics (coco-caption's arithmetic order)."""
  scores = []
  prod = 1.0
  for k in range(n):
    prod *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
    scores.append(prod ** (1.0 / (k + 1)))
  ratio = (testlen + _TINY) / (reflen + _SMALL)
  if ratio < 1:
    penalty = math.exp(1 - 1 / ratio)
    scores = [s * penalty for s in scores]
  return scores


def compute_bleu(gts: Dict, res: Dict, n: int = MAX_N) -> Tuple[List[float], List[np.ndarray]]:
  """Corpus and per-image BLEU-1..n.

  Args:
    gts: dict key -> list of tokenized reference strings (at least one).
    res: dict key -> list holding one tokenized hypothesis string; same keys.
    n: highest n-gram order.

  Returns:
    (corpus, per_image): corpus is a list of n floats; per_image a list of n
    arrays [num_images] in the order of `gts`' keys.
  """
  total_test = total_ref = 0
  total_guess = [0] * n
  total_correct = [0] * n
  per_image = [[] for _ in range(n)]
  for key in gts:
    testlen, reflen, guess, correct = _image_stats(res[key][0], gts[key], n)
    total_test += testlen
    total_ref += reflen
    for k in range(n):
      total_guess[k] += guess[k]
      total_correct[k] += correct[k]
    for k, s in enumerate(_bleu_from_stats(testlen, reflen, guess, correct, n)):
      per_image[k].append(s)
  corpus = _bleu_from_stats(total_test, total_ref, total_guess, total_correct, n)
  return corpus, [np.array(p) for p in per_image]
