"""Benchmark: scoring every sentence against every image of a split (`captionjax rank`).

    python experiments/benchmarks/bench_rank.py --workdir=runs/ranking --num_images=1000
    python experiments/benchmarks/bench_rank.py --workdir=runs/default --num_images=100

The workdir's model (the alignment model, or a captioner as a generative
ranker) scores the split's first N images x all their sentences in one jitted
program (ranking.Ranker: chunks of sentences under lax.map). Compiled once,
then the median of --repeats passes, each followed by a float32 matmul
(the CPU's practical peak, timed in the same rounds). For the alignment model
the word-region dot products' FLOPs (2 M T N P H) are given as a fraction of
that peak.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_caption import matmul_fn  # pylint: disable=g-import-not-at-top,wrong-import-position
from captionjax import inference, input_pipeline, ranking  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished `captionjax train` workdir")
  p.add_argument("--split", default="test")
  p.add_argument("--num_images", type=int, default=1000)
  p.add_argument("--prior", default="none", choices=("none", "blank"))
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  model = inference.load_workdir(args.workdir, kinds=None)
  data = input_pipeline.load_split(input_pipeline.data_dir_for(model.config), args.split)
  ranker = ranking.Ranker(model, prior=args.prior)
  tokens, image_of = ranking.split_sentences(data, args.num_images)
  n = int(image_of.max()) + 1
  feats = ranker.features(ranking.split_images(data, n, model.input_size))
  mm, mm_flops = matmul_fn()
  jax.block_until_ready(mm())
  ranker.score(feats, tokens)  # compiles, and a first pass
  compile_s = ranker.timing["compile_s"]
  times, peaks = [], []
  for _ in range(args.repeats):
    ranker.score(feats, tokens)
    times.append(ranker.timing["score_s"])
    t = time.perf_counter()
    jax.block_until_ready(mm())
    peaks.append(mm_flops / (time.perf_counter() - t) / 1e9)
  sec, peak = statistics.median(times), statistics.median(peaks)
  m = len(tokens)
  row = {"workdir": args.workdir, "model": ranker.kind, "prior": args.prior, "images": n,
         "sentences": m, "pairs": m * n, "compile_s": compile_s, "score_s": round(sec, 3),
         "pairs_per_s": round(m * n / sec), "matmul_peak_gflops": round(peak, 1),
         "load_average": round(os.getloadavg()[0], 1)}
  if ranker.kind == "ranking":
    lm = model.lm
    flops = 2.0 * m * tokens.shape[1] * n * lm.regions * lm.features
    row["dot_gflops_per_s"] = round(flops / sec / 1e9, 1)
    row["fraction_of_matmul_peak"] = round(flops / sec / 1e9 / peak, 3)
  print(json.dumps(row))


if __name__ == "__main__":
  main()
