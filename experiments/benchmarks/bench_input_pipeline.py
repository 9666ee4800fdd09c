"""Benchmark: the tf.data input pipeline on the default shapes set, in batches/s.

  python experiments/benchmarks/bench_input_pipeline.py [--data_dir=DIR] \
      [--batch_size=32] [--seq_per_img=5] [--batches=100] [--repeats=5]

Times `input_pipeline.TrainIterator` (training batches: shuffled stream,
random caption choice, START/END, masks) and `input_pipeline.eval_batches`
(every example of a split in order, padded) on the prepro output of the
default shapes set (generated on first use, in the same cache as
`captionjax train`). The baseline, measured in the same run, is plain numpy
on the same in-memory arrays: fancy-indexing a random batch of images and of
each image's first `seq_per_img` captions, adding START/END columns and the
mask. It does the least work a batch needs, so the ratio is the pipeline's
overhead. Every figure is the median of `--repeats` timed runs after one
warm-up run; a run is `--batches` consecutive batches (eval: one pass over
the split).
"""

import argparse
import os
import statistics
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from captionjax import input_pipeline  # pylint: disable=g-import-not-at-top


def default_data_dir() -> str:
  """The prepro output of the embedded default set, as `captionjax train` makes it."""
  from captionjax import configs, input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.data_dir_for(configs.load_config("default"))


def numpy_batches(data: input_pipeline.SplitData, batch_size: int, seq_per_img: int,
                  seed: int = 0):
  """Baseline: random batches by numpy fancy-indexing, with START/END and mask."""
  rng = np.random.default_rng(seed)
  n = len(data)
  while True:
    rows = rng.integers(0, n, size=batch_size)  # -> [B]
    images = data.images[rows]  # -> [B, H, W, 3]
    caps = data.captions[rows, :seq_per_img]  # -> [B, S, max_length]
    pad = np.zeros(caps.shape[:2] + (1,), caps.dtype)
    full = np.concatenate([pad, caps, pad], axis=2)  # -> [B, S, L]
    length = (caps > 0).sum(axis=2)  # -> [B, S]
    pos = np.arange(full.shape[2])
    mask = ((pos >= 1) & (pos <= length[..., None] + 1)).astype(np.float32)
    yield {"image": images, "captions": full, "mask": mask,
           "image_id": data.image_id[rows], "row": rows}


def time_runs(make_run, repeats: int) -> list[float]:
  """Runs `make_run()` once to warm up, then `repeats` times; returns seconds."""
  make_run()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    make_run()
    times.append(time.perf_counter() - t)
  return times


def take(it, count: int) -> dict:
  batch = None
  for _ in range(count):
    batch = next(it)
  return batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="",
                      help="a prepro output directory (default: the shapes set of the default config)")
  parser.add_argument("--batch_size", type=int, default=32, help="images per batch")
  parser.add_argument("--seq_per_img", type=int, default=5, help="captions per image")
  parser.add_argument("--eval_batch_size", type=int, default=100, help="images per eval batch")
  parser.add_argument("--batches", type=int, default=100, help="training batches per timed run")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure")
  parser.add_argument("--threads", type=int, default=2, help="tf.data threads")
  args = parser.parse_args()

  data_dir = args.data_dir or default_data_dir()
  t = time.perf_counter()
  train_data = input_pipeline.load_split(data_dir, "train")
  val_data = input_pipeline.load_split(data_dir, "test")
  t_load = time.perf_counter() - t
  b, s = args.batch_size, args.seq_per_img

  train_it = input_pipeline.TrainIterator(train_data, b, seq_per_img=s, seed=0,
                                          threads=args.threads)
  first = next(train_it)  # builds the dataset; not timed
  base_it = numpy_batches(train_data, b, s)
  ref = next(base_it)
  for k in ("image", "captions", "mask"):
    assert first[k].shape == ref[k].shape and first[k].dtype == ref[k].dtype, k

  results = {}
  results["TrainIterator"] = time_runs(lambda: take(train_it, args.batches), args.repeats)
  results["numpy baseline"] = time_runs(lambda: take(base_it, args.batches), args.repeats)
  n_eval = -(-len(val_data) // args.eval_batch_size)
  results["eval_batches"] = time_runs(
      lambda: list(input_pipeline.eval_batches(val_data, args.eval_batch_size, s,
                                               threads=args.threads)), args.repeats)

  print(f"data: {data_dir}")
  print(f"train {len(train_data)} images ({train_data.image_size} px), eval split 'test' "
        f"{len(val_data)} images; loaded in {t_load:.1f} s")
  print(f"median of {args.repeats} runs after a warm-up; os.cpu_count()={os.cpu_count()}, "
        f"tf.data threads {args.threads}")
  rate = {}
  for name, times in results.items():
    count = n_eval if name == "eval_batches" else args.batches
    size = args.eval_batch_size if name == "eval_batches" else b
    med = statistics.median(times)
    rate[name] = count / med
    print(f"{name:16s} {count / med:9.1f} batches/s  {count * size / med:10.0f} images/s  "
          f"(batch {size} x {s} captions; {count} batches in {med * 1e3:.1f} ms, "
          f"range {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})")
  print(f"TrainIterator / numpy baseline: {rate['TrainIterator'] / rate['numpy baseline']:.2f}x")


if __name__ == "__main__":
  main()
