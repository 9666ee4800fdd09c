"""CIDEr-D, vectorized with numpy (matches pycocoevalcap's `Cider` / `CiderD`).

CIDEr-D of a candidate c for image i with references r_1..r_J:

  CIDEr-D(c) = 10 / J * sum_j mean_n [ sum_g min(v_c[g], v_j[g]) * v_j[g]
                                       / (|v_c|_n |v_j|_n) * exp(-d_j^2 / 2 sigma^2) ]

where v[g] = tf(g) * (log(I) - log(max(1, df(g)))) is the tf-idf weight of
n-gram g (order n = 1..4), df(g) the number of images whose references hold g
(from the references of the scored set, I images), |v|_n the norm over n-grams
of order n, and d_j the difference in bigram counts of c and r_j (coco-caption
measures "length" in bigrams: max(0, words - 1)).

`CiderD` is built once from a set's references (document frequencies, the
reference vectors) and then scores many candidates per image in one numpy pass:
n-grams become int64 keys (word ids as digits in a fixed base), candidate n-gram counts come
from a sort, and matches against the references from `searchsorted`.

Shapes: I images, J max references per image, R references in all, B images
scored in a call, K candidates per image, M = B*K candidates, L tokens, N
n-gram order (4), G distinct reference n-grams, E candidate n-gram entries.
"""

import itertools
import math
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

MAX_N = 4
SIGMA = 6.0  # standard deviation of the Gaussian length penalty
SCALE = 10.0  # coco-caption multiplies CIDEr-D by 10
PAD_ID = 0  # token id of padding in token arrays; later tokens are ignored
_INT64_MAX = np.iinfo(np.int64).max


def _encode(captions: Sequence[str], word_to_id: Dict[str, int],
            extra: Optional[Dict[str, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
  """Turns tokenized caption strings into a padded id matrix.

  Words missing from `word_to_id` get fresh ids (> all known ids) recorded in
  `extra`, so that distinct unknown words stay distinct n-grams.

  Returns:
    tokens: int64 [M, L] (0-padded), lengths: int64 [M].
  """
  split = [c.split() for c in captions]
  lengths = np.fromiter(map(len, split), np.int64, len(split))
  flat = list(itertools.chain.from_iterable(split))
  ids = list(map(word_to_id.get, flat))
  if None in ids:
    if extra is None:
      raise ValueError("caption word missing from the CIDEr-D vocabulary")
    for i, (w, v) in enumerate(zip(flat, ids)):
      if v is None:
        v = extra.get(w)
        if v is None:
          v = extra[w] = len(word_to_id) + len(extra) + 1
        ids[i] = v
  M, L = len(split), max(1, int(lengths.max(initial=0)))
  tokens = np.zeros((M, L), np.int64)
  row = np.repeat(np.arange(M), lengths)  # -> [sum(lengths)]
  col = np.arange(row.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  tokens[row, col] = np.array(ids, np.int64)
  return tokens, lengths


def _ngram_entries(tokens: np.ndarray, lengths: np.ndarray, n: int, base: int
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Distinct n-grams of each row with their counts.

  Args:
    tokens: int64 [M, L] word ids >= 1, padded with 0 beyond `lengths`.
    lengths: int64 [M].
    n: highest n-gram order.
    base: int, larger than every word id; n-gram key = ids as digits in `base`,
      so keys of order k lie in [base**(k-1), base**k).

  Returns:
    rows [E], keys [E] (int64), counts [E] (float64), orders [E] (0..n-1),
    one entry per distinct (row, n-gram), sorted by row then key.
  """
  M, L = tokens.shape
  blocks = []
  key = np.zeros((M, L), np.int64)
  pos = np.arange(L)[None, :]
  for k in range(min(n, L)):  # k = order - 1
    width = L - k
    key = key[:, :width] * base + tokens[:, k:]  # -> [M, L-k]
    valid = pos[:, :width] + k < lengths[:, None]  # -> [M, L-k]
    blocks.append(np.where(valid, key, _INT64_MAX))
  keys = np.sort(np.concatenate(blocks, axis=1), axis=1)  # -> [M, W], pads last
  valid = keys != _INT64_MAX
  new = valid.copy()
  new[:, 1:] &= keys[:, 1:] != keys[:, :-1]
  rows, cols = np.nonzero(new)  # row-major: sorted by row then key
  flat_new = np.flatnonzero(new.ravel())
  # Count of each distinct n-gram = distance to the next distinct one (or the
  # end of the row's valid keys).
  row_ends = rows * keys.shape[1] + valid.sum(1)[rows]
  nxt = np.append(flat_new[1:], 0)
  nxt = np.where(np.append(rows[1:] == rows[:-1], False), nxt, row_ends)
  counts = (nxt - flat_new).astype(np.float64)
  ukeys = keys[rows, cols]
  thresholds = np.array([base**k for k in range(1, n)], np.int64)
  orders = np.searchsorted(thresholds, ukeys, side="right").astype(np.int64)
  return rows, ukeys, counts, orders


class CiderD:
  """Batched CIDEr-D against the references of one set.

  Build once per reference set (e.g. the training split for a self-critical
  reward, or the evaluation split), then call `score` as often as needed.
  Agrees with pycocoevalcap's `Cider().compute_score(gts, res)` per image when
  `gts` is the reference set given here.

  Args:
    refs: mapping image key -> list of tokenized reference strings (words
      separated by whitespace, as coco-caption's tokenizer gives them).
    n: highest n-gram order (4).
    sigma: standard deviation of the length penalty (6).
    vocab: optional sequence of words indexed by model token id, to score token
      arrays directly; id `PAD_ID` is padding/end.
  """

  def __init__(self, refs: Mapping[Hashable, Sequence[str]], n: int = MAX_N,
               sigma: float = SIGMA, vocab: Optional[Sequence[str]] = None):
    if not refs:
      raise ValueError("CiderD needs at least one image with references")
    self.n, self.sigma = n, sigma
    self.keys = list(refs)
    self.key_index = {k: i for i, k in enumerate(self.keys)}
    num_images = len(self.keys)

    ref_caps, ref_image = [], []
    for i, key in enumerate(self.keys):
      caps = list(refs[key])
      if not caps:
        raise ValueError(f"image {key!r} has no reference captions")
      ref_caps += caps
      ref_image += [i] * len(caps)
    ref_image = np.array(ref_image, np.int64)  # -> [R]

    words = dict.fromkeys(itertools.chain.from_iterable(c.split() for c in ref_caps))
    self.word_to_id: Dict[str, int] = {w: i + 1 for i, w in enumerate(words)}
    self._vocab_ids = None
    if len(self.word_to_id) >= self._base():
      raise ValueError(f"CiderD: {len(self.word_to_id)} reference words exceed "
                       f"the {self._base() - 1} that int64 {n}-gram keys hold")
    if vocab is not None:
      for w in vocab:
        self.word_to_id.setdefault(w, len(self.word_to_id) + 1)
      self._vocab_ids = np.array([self.word_to_id[w] for w in vocab], np.int64)
      self._vocab_ids[PAD_ID] = 0
      if len(self.word_to_id) >= self._base():
        raise ValueError(f"CiderD: {len(self.word_to_id)} words (references "
                         f"and vocab) exceed int64 {n}-gram keys")

    tokens, lengths = _encode(ref_caps, self.word_to_id)
    rows, keys, counts, orders = _ngram_entries(tokens, lengths, n, self._base())

    # Document frequency: number of images whose references hold the n-gram,
    # counted over distinct (image, n-gram) pairs.
    self.ngram_keys, g = np.unique(keys, return_inverse=True)  # [G], [E]
    G = self.ngram_keys.size
    pair_keys, pair_inv = np.unique(ref_image[rows] * G + g, return_inverse=True)
    df = np.bincount(pair_keys % G, minlength=G)
    self.ref_len = math.log(float(num_images))
    self.idf = self.ref_len - np.log(np.maximum(1.0, df))  # -> [G]

    # Reference tf-idf vectors, norms per order and bigram "lengths".
    vals = counts * self.idf[g]  # -> [E]
    R = len(ref_caps)
    self.ref_norm = np.sqrt(np.bincount(rows * n + orders, vals**2,
                                        minlength=R * n)).reshape(R, n)
    self.ref_bigrams = np.maximum(lengths - 1, 0).astype(np.float64)  # -> [R]

    # Slot of each reference within its image; [I, J] table of ref rows.
    self.num_refs = np.bincount(ref_image, minlength=num_images)  # -> [I]
    offsets = np.concatenate([[0], np.cumsum(self.num_refs)[:-1]])
    slot = np.arange(R) - offsets[ref_image]
    J = int(self.num_refs.max())
    self.image_refs = np.full((num_images, J), -1, np.int64)
    self.image_refs[ref_image, slot] = np.arange(R)

    # For each distinct (image, n-gram) pair, the n-gram's value in each of the
    # image's references: pair_keys [P] sorted, pair_vals [P, J].
    self.pair_keys = pair_keys
    self.pair_vals = np.zeros((pair_keys.size, J))
    self.pair_vals[pair_inv, slot[rows]] = vals

  def _base(self) -> int:
    """Digit base of n-gram keys: the largest with base**n within int64.

    Fixed per order so that reference keys stay valid when a call brings
    unknown words (ids above the reference vocabulary).
    """
    base = int(round(_INT64_MAX ** (1.0 / self.n)))
    while base ** self.n > _INT64_MAX:
      base -= 1
    return base

  def _candidate_tokens(self, candidates, batch: int
                        ) -> Tuple[np.ndarray, np.ndarray, int, int]:
    """Candidates -> (tokens [M, L], lengths [M], K, base)."""
    if isinstance(candidates, np.ndarray) or (
        hasattr(candidates, "shape") and hasattr(candidates, "dtype")):
      arr = np.asarray(candidates)
      if arr.ndim == 2:
        arr = arr[:, None, :]
      if arr.ndim != 3 or arr.shape[0] != batch:
        raise ValueError(f"candidates: expected token ids [{batch}, K, L], got {arr.shape}")
      if self._vocab_ids is None:
        raise ValueError("CiderD: token-id candidates need `vocab` at construction")
      K = arr.shape[1]
      ids = arr.reshape(batch * K, -1).astype(np.int64)
      alive = np.cumprod(ids != PAD_ID, axis=1).astype(bool)  # stop at first pad
      tokens = np.where(alive, self._vocab_ids[ids], 0)
      return tokens, alive.sum(1), K, self._base()
    if len(candidates) != batch:
      raise ValueError(f"candidates: {len(candidates)} lists for {batch} images")
    if batch and isinstance(candidates[0], str):
      candidates = [[c] for c in candidates]
    K = len(candidates[0]) if batch else 0
    if any(len(c) != K for c in candidates):
      raise ValueError("candidates: every image needs the same number of candidates")
    extra: Dict[str, int] = {}
    tokens, lengths = _encode([c for cs in candidates for c in cs], self.word_to_id, extra)
    base = self._base()
    if len(self.word_to_id) + len(extra) >= base:
      raise ValueError(f"CiderD: {len(extra)} unknown candidate words overflow "
                       f"int64 {self.n}-gram keys; score in smaller batches")
    return tokens, lengths, K, base

  def score(self, image_keys: Sequence[Hashable],
            candidates: Union[Sequence[Sequence[str]], np.ndarray]) -> np.ndarray:
    """CIDEr-D of K candidates for each of B images.

    Args:
      image_keys: B keys of images given at construction.
      candidates: B lists of K tokenized caption strings (or B strings, K=1),
        or int token ids [B, K, L] in `vocab` (0 = padding/end).

    Returns:
      float64 [B, K] CIDEr-D scores.
    """
    try:
      img = np.array([self.key_index[k] for k in image_keys], np.int64)  # [B]
    except KeyError as e:
      raise KeyError(f"CiderD: image {e.args[0]!r} has no references") from None
    B = img.size
    tokens, lengths, K, base = self._candidate_tokens(candidates, B)
    if B == 0 or K == 0:
      return np.zeros((B, K))
    M, n = B * K, self.n
    cand_img = np.repeat(img, K)  # -> [M]
    rows, keys, counts, orders = _ngram_entries(tokens, lengths, n, base)
    G = self.ngram_keys.size
    g = np.minimum(np.searchsorted(self.ngram_keys, keys), G - 1)
    known = self.ngram_keys[g] == keys
    weight = np.where(known, self.idf[g], self.ref_len)
    vals = counts * weight  # -> [E]
    cand_norm = np.sqrt(np.bincount(rows * n + orders, vals**2,
                                    minlength=M * n)).reshape(M, n)

    # Clipped dot products with each reference of the candidate's image.
    J = self.image_refs.shape[1]
    dots = np.zeros((M * n, J))
    pk = cand_img[rows] * G + g
    p = np.minimum(np.searchsorted(self.pair_keys, pk), self.pair_keys.size - 1)
    hit = known & (self.pair_keys[p] == pk)
    ref_vals = self.pair_vals[p[hit]]  # -> [E', J]
    contrib = np.minimum(vals[hit][:, None], ref_vals) * ref_vals  # -> [E', J]
    slot_of = rows[hit] * n + orders[hit]
    for j in range(J):
      dots[:, j] = np.bincount(slot_of, contrib[:, j], minlength=M * n)
    dots = dots.reshape(M, n, J)

    ref_rows = self.image_refs[cand_img]  # -> [M, J], -1 where absent
    valid = ref_rows >= 0
    safe_rows = np.where(valid, ref_rows, 0)
    ref_norm = self.ref_norm[safe_rows].transpose(0, 2, 1)  # -> [M, n, J]
    denom = cand_norm[:, :, None] * ref_norm
    sim = np.where(denom != 0, dots / np.where(denom != 0, denom, 1.0), dots)
    delta = np.maximum(lengths - 1, 0)[:, None] - self.ref_bigrams[safe_rows]  # [M, J]
    penalty = np.exp(-(delta**2) / (2 * self.sigma**2))
    per_ref = sim.mean(axis=1) * penalty * valid  # -> [M, J]
    out = per_ref.sum(axis=1) / self.num_refs[cand_img] * SCALE
    return out.reshape(B, K)


def compute_cider(gts: Mapping, res: Mapping, n: int = MAX_N, sigma: float = SIGMA
                  ) -> Tuple[float, np.ndarray]:
  """Corpus (mean) and per-image CIDEr-D, document frequencies from `gts`.

  Args:
    gts: dict key -> list of tokenized reference strings.
    res: dict key -> list holding one tokenized hypothesis; same keys.

  Returns:
    (mean score, array [num_images] in the order of `gts`' keys).
  """
  scorer = CiderD(gts, n=n, sigma=sigma)
  keys = list(gts)
  scores = scorer.score(keys, [res[k][0] for k in keys])[:, 0]
  return float(np.mean(scores)), scores
