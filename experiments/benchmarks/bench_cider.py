"""Benchmark: batched CIDEr-D (`captionjax.metrics.CiderD`) vs pycocoevalcap's `Cider`.

  python experiments/benchmarks/bench_cider.py [--images=5000] [--candidates=5]

Generates realistic synthetic captions (templated scenes, 5 references per
image), scores `--candidates` candidates for every image, and prints the median
time of `--repeats` runs after one warm-up for each scorer, the speed ratio and
the largest score difference. pycocoevalcap scores one candidate per image per
call, so it runs once per candidate column. Ours includes building the scorer
(document frequencies) in every run.
"""

import argparse
import random
import statistics
import time

import numpy as np

from captionjax.metrics import CiderD

NUM_REFS = 5
SUBJECTS = ["a man", "a woman", "a young boy", "a little girl", "two dogs", "a black dog",
            "a brown dog", "a group of people", "a child", "a surfer", "a skier",
            "three men", "a cyclist", "a white cat", "a crowd", "an old man"]
VERBS = ["is running", "is jumping", "is sitting", "is standing", "plays", "rides a bike",
         "is walking", "is climbing", "is swimming", "is holding a ball", "looks",
         "is smiling", "is riding a wave", "is skiing", "waits", "is eating"]
PLACES = ["on the beach", "in the snow", "through the grass", "in a park", "on a street",
          "near the water", "in front of a building", "on a rock", "in the ocean",
          "at the beach", "down a hill", "in a field", "on a red bench", "in the air"]
EXTRAS = ["", "", "with a red shirt", "wearing a blue hat", "while another watches",
          "at night", "in the sun", "with a frisbee", "next to a tree"]


def make_caption(rng: random.Random) -> str:
  """One tokenized synthetic caption."""
  parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(PLACES), rng.choice(EXTRAS)]
  return " ".join(p for p in parts if p)


def make_data(num_images: int, num_candidates: int, seed: int = 0):
  """Returns (refs {image: [5 captions]}, candidates [images][K])."""
  rng = random.Random(seed)
  refs = {f"img{i}": [make_caption(rng) for _ in range(NUM_REFS)] for i in range(num_images)}
  cands = [[make_caption(rng) if rng.random() < 0.7 else rng.choice(refs[k])
            for _ in range(num_candidates)] for k in refs]
  return refs, cands


def run_ours(refs, cands):
  scorer = CiderD(refs)
  return scorer.score(list(refs), cands)


def run_reference(refs, cands):
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  keys = list(refs)
  cols = []
  for j in range(len(cands[0])):
    res = {k: [cands[i][j]] for i, k in enumerate(keys)}
    _, scores = Cider().compute_score(refs, res)
    cols.append(np.asarray(scores))
  return np.stack(cols, axis=1)


def timed(fn, repeats: int):
  fn()  # warm-up
  times, out = [], None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=5000)
  parser.add_argument("--candidates", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  refs, cands = make_data(args.images, args.candidates)
  t_ours, ours = timed(lambda: run_ours(refs, cands), args.repeats)
  scorer = CiderD(refs)
  t_score, _ = timed(lambda: scorer.score(list(refs), cands), args.repeats)
  t_ref, ref = timed(lambda: run_reference(refs, cands), args.repeats)
  print(f"{args.images} images x {args.candidates} candidates, {NUM_REFS} refs each; "
        f"median of {args.repeats} after a warm-up")
  print(f"pycocoevalcap Cider:          {t_ref:8.3f} s")
  print(f"CiderD (build + score):       {t_ours:8.3f} s   ratio {t_ref / t_ours:6.1f}x")
  print(f"CiderD (score only, prebuilt): {t_score:7.3f} s   ratio {t_ref / t_score:6.1f}x")
  print(f"max |difference|:             {np.abs(ours - ref).max():.2e}")


if __name__ == "__main__":
  main()
