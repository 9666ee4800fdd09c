"""ROUGE-L as coco-caption computes it (pycocoevalcap `Rouge`).

For each image: the longest common subsequence (LCS) of the hypothesis with
each reference gives precision LCS/|hyp| and recall LCS/|ref|; the maxima over
references combine into an F-measure weighted by `BETA` (recall-heavy). Tokens
come from splitting on single spaces, exactly as coco-caption does.
"""

from typing import Dict, Sequence, Tuple

import numpy as np

BETA = 1.2  # coco-caption's recall weight


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence of two token lists (O(|a||b|))."""
  if len(a) < len(b):
    a, b = b, a
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(hyp: str, refs: Sequence[str], beta: float = BETA) -> float:
  """ROUGE-L F-measure of one tokenized hypothesis against its references."""
  hyp_tokens = hyp.split(" ")
  prec, rec = [], []
  for ref in refs:
    ref_tokens = ref.split(" ")
    lcs = lcs_length(ref_tokens, hyp_tokens)
    prec.append(lcs / float(len(hyp_tokens)))
    rec.append(lcs / float(len(ref_tokens)))
  p, r = max(prec), max(rec)
  if p == 0 or r == 0:
    return 0.0
  return ((1 + beta**2) * p * r) / float(r + beta**2 * p)


def compute_rouge(gts: Dict, res: Dict) -> Tuple[float, np.ndarray]:
  """Corpus (mean) and per-image ROUGE-L.

  Args:
    gts: dict key -> list of tokenized reference strings.
    res: dict key -> list holding one tokenized hypothesis; same keys.

  Returns:
    (mean score, array [num_images] in the order of `gts`' keys).
  """
  scores = np.array([rouge_l(res[k][0], gts[k]) for k in gts])
  return float(np.mean(scores)), scores
