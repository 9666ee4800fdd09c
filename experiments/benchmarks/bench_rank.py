"""Benchmark: scoring every sentence against every image of a split (`captionjax rank`).

    python experiments/benchmarks/bench_rank.py --workdir=runs/ranking --num_images=1000
    python experiments/benchmarks/bench_rank.py --workdir=runs/default --num_images=100

The workdir's model (the alignment model, or a captioner as a generative
ranker) scores the split's first N images x all their sentences in one jitted
program (ranking.Ranker: chunks of sentences under lax.map). Compiled once,
then the median of --repeats passes, each followed by a float32 matmul
(the CPU's practical peak, timed in the same rounds). For the alignment model
the word-region dot products' FLOPs (2 M T N P H) are given as a fraction of
that peak. For a captioner, the pair step's FLOPs per scored token are given
the same way, and the same pairs are also scored by plain teacher forcing
(each chunk's sentences tiled over the images and run through the whole
captioner: the word side and the image side per pair), the baseline of
`speedup_vs_teacher_forcing`.
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_caption import matmul_fn  # pylint: disable=g-import-not-at-top,wrong-import-position
from captionjax import inference, input_pipeline, ranking  # pylint: disable=g-import-not-at-top,wrong-import-position


def teacher_forcing_scorer(lm, chunk: int):
  """The baseline: (params, feats [N, D], captions [M, L]) -> [M, N], every
  pair teacher-forced through the captioner's __call__."""
  def fn(params, feats, captions):
    n, counted = feats.shape[0], (captions > 0).sum(-1) + 1  # words and END

    def one(args):
      caps, count = args  # [c, L], [c]
      tiled = jnp.broadcast_to(caps[None], (n,) + caps.shape)  # -> [N, c, L]
      logp = jax.nn.log_softmax(lm.apply({"params": params}, feats, tiled), axis=-1)
      tok = jnp.take_along_axis(logp, tiled[..., 1:, None], axis=-1)[..., 0]  # -> [N, c, L-1]
      mask = jnp.arange(caps.shape[-1] - 1)[None, :] < count[:, None]  # -> [c, L-1]
      return ((tok * mask).sum(-1) / count).T  # -> [c, N]

    out = jax.lax.map(one, (captions.reshape(-1, chunk, captions.shape[-1]),
                            counted.reshape(-1, chunk)))
    return out.reshape(-1, n)
  return fn


def pair_token_flops(lm, vocab_size: int) -> float:
  """Multiply-adds x 2 of one pair step per pair (the per-pair matmuls)."""
  e, h, p = lm.input_encoding_size, lm.rnn_size, lm.attention_regions
  gates = 4 * h if lm.rnn_type == "lstm" else h
  per = lm.num_layers * h * gates + (lm.num_layers - 1) * h * gates + h * (vocab_size + 1)
  if p:  # the query, the scores, the context, and the first layer's input map
    per += (h + e) * e + p * e + p * e + e * gates
  elif lm.image_every_step:
    per += e * gates
  return 2.0 * per


def time_baseline(ranker, feats, tokens, repeats: int) -> float:
  """Median seconds of the teacher-forcing baseline on the same pairs."""
  x = ranking.caption_buffer(tokens)
  c = max(1, min(len(x), ranking.CHUNK_BYTES // (feats.shape[0] * x.shape[1]
                                                 * (len(ranker.model.vocab) + 1) * 12)))
  x = np.concatenate([x, np.zeros((-len(x) % c, x.shape[1]), x.dtype)])
  fn = jax.jit(teacher_forcing_scorer(ranker.model.lm, c))
  args = (ranker.head, jnp.asarray(feats), x)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished `captionjax train` workdir")
  p.add_argument("--split", default="test")
  p.add_argument("--num_images", type=int, default=1000)
  p.add_argument("--prior", default="none", choices=("none", "blank"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--baseline", type=int, default=1,
                 help="a captioner: also time plain teacher forcing (1) or not (0)")
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
  else:
    counted = float(((tokens > 0).sum(-1) + 1).sum())
    flops = counted * n * pair_token_flops(model.lm, len(model.vocab))
    row["pair_step_gflops_per_s"] = round(flops / sec / 1e9, 1)
    row["fraction_of_matmul_peak"] = round(flops / sec / 1e9 / peak, 3)
    if args.baseline and args.prior == "none":
      base = time_baseline(ranker, feats, tokens, args.repeats)
      row["teacher_forcing_s"] = round(base, 3)
      row["speedup_vs_teacher_forcing"] = round(base / sec, 2)
  print(json.dumps(row))


if __name__ == "__main__":
  main()
