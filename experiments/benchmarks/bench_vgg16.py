"""Benchmark: VGG16 (224x224, up to fc7) forward and forward+backward on this machine.

  python experiments/benchmarks/bench_vgg16.py [--batch_sizes=1,8,32] [--repeats=3]
      [--variants=batched,per_image] [--output=FILE.json]

For each batch size and variant ("batched": one convolution over the batch;
"per_image": VGG16(conv_per_image=True), a scan over the images), prints
images/s of the jitted forward pass (inference, fc7) and of forward plus
backward (the gradient of all parameters, as when fine-tuning), as the median
of `--repeats` timed runs after one warm-up (compilation excluded; fewer runs
where they would exceed `--budget_s`, the count is printed). Also
measures this machine's float32 matmul peak in the same run (the median
GFLOP/s of a jitted `jnp.dot` of two N x N matrices) and reports each
configuration's fraction of it. FLOPs are counted analytically (2 per
multiply-add): 30.9 GFLOP per image forward; forward+backward is counted as 3x
forward (the usual estimate: one product for the input gradient and one for
the weight gradient per layer).
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from captionjax.models.vgg import VGG16, vgg16_flops  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZE = 224


def timed(fn, repeats: int, budget_s: float = float("inf")) -> tuple[float, int]:
  """(median seconds, runs) of `repeats` runs after one warm-up (which
  compiles); fewer runs (at least 1) when the warm-up says `repeats` would
  take more than `budget_s`."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  repeats = int(max(1, min(repeats, budget_s // max(time.perf_counter() - t, 1e-9))))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), repeats


def matmul_peak(n: int, repeats: int) -> float:
  """float32 GFLOP/s of a jitted n x n by n x n matmul."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  return 2.0 * n ** 3 / timed(lambda: dot(a, b), repeats)[0] / 1e9


def bench(batch_sizes, variants, repeats, budget_s):
  rows = []
  for variant in variants:
    model = VGG16(output="fc7", conv_per_image=(variant == "per_image"))
    params = None
    fwd = jax.jit(lambda p, x: model.apply(p, x))
    grad = jax.jit(jax.grad(lambda p, x: model.apply(p, x).sum()))
    for b in batch_sizes:
      x = jax.random.uniform(jax.random.key(2), (b, SIZE, SIZE, 3), jnp.float32)
      if params is None:
        params = jax.jit(model.init)(jax.random.key(0), x[:1])
      for kind, fn, factor in (("forward", fwd, 1.0), ("forward+backward", grad, 3.0)):
        t, runs = timed(lambda: fn(params, x), repeats, budget_s)
        gflops = factor * vgg16_flops() * b / t / 1e9
        rows.append({"variant": variant, "batch": b, "pass": kind, "seconds": t, "runs": runs,
                     "images_per_s": b / t, "gflops": gflops})
        print(f"  {variant:9s} batch {b:3d} {kind:17s} {t:8.3f} s  {b / t:7.2f} images/s  "
              f"{gflops:7.1f} GFLOP/s  (median of {runs})", flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_sizes", default="1,8,32")
  parser.add_argument("--variants", default="batched,per_image")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--budget_s", type=float, default=600.0,
                      help="fewer timed runs (at least 1) where the repeats would take longer")
  parser.add_argument("--output", default="", help="also write the results as JSON here")
  args = parser.parse_args()
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  variants = args.variants.split(",")
  print(f"{jax.devices()[0].device_kind} x {jax.device_count()}, {os.cpu_count()} CPUs; "
        f"median of {args.repeats} after a warm-up; VGG16 forward "
        f"{vgg16_flops() / 1e9:.1f} GFLOP/image", flush=True)
  peak_before = matmul_peak(args.matmul_size, max(args.repeats, 5))
  print(f"matmul peak ({args.matmul_size}^3 float32): {peak_before:.1f} GFLOP/s", flush=True)
  rows = bench(batch_sizes, variants, args.repeats, args.budget_s)
  peak_after = matmul_peak(args.matmul_size, max(args.repeats, 5))
  peak = max(peak_before, peak_after)
  print(f"matmul peak again: {peak_after:.1f} GFLOP/s; fractions below use {peak:.1f}")
  print(f"{'variant':9s} {'batch':>5s} {'pass':17s} {'images/s':>9s} {'GFLOP/s':>8s} "
        f"{'of peak':>8s} {'runs':>5s}")
  for r in rows:
    r["fraction_of_peak"] = r["gflops"] / peak
    print(f"{r['variant']:9s} {r['batch']:5d} {r['pass']:17s} {r['images_per_s']:9.2f} "
          f"{r['gflops']:8.1f} {r['fraction_of_peak']:8.1%} {r['runs']:5d}")
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump({"device": jax.devices()[0].device_kind, "matmul_peak_gflops": peak,
                 "matmul_peak_before_after": [peak_before, peak_after],
                 "forward_gflop_per_image": vgg16_flops() / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
