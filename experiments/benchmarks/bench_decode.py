"""Benchmark: JPEG decoding per CPU core at VGG16's 224 pixels (how many cores feed a GPU).

  python experiments/benchmarks/bench_decode.py [--photos_dir=DIR] [--images=320]
      [--image_size=224] [--repeats=5] [--output=FILE.json]

Two rates, each on one core (one thread), as images per second of wall time
and per second of this process's CPU time (on a shared machine the CPU-time
rate is the per-core capacity; the wall rate is what this run got):

  prepro       what `captionjax prepro` does per image: decode a COCO-sized
               JPEG (long side 640, quality 90), resize to 224x224 (JPEG draft
               decoding at a reduced scale, then bicubic: captionjax.images),
               re-encode (JPEG quality 95); done once per image;
  train_input  what training does per image and step when the images are not
               cached as features (fine-tuning): the input pipeline
               (input_pipeline.train_dataset with one thread) decoding the
               224x224 JPEG records, choosing 5 captions, batching 16;
  decode_only  tf.io.decode_image of those 224x224 JPEGs alone, one thread.

The images: `--photos_dir`'s JPEGs (cycled to `--images`), each first saved
as COCO's files are (long side 640, quality 90); without it, generated
photo-like images of 640x480. Median of `--repeats` passes after one warm-up.
"""

import argparse
import glob
import io
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from captionjax import images as images_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from captionjax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

COCO_LONG_SIDE = 640
BATCH = 16
SEQ_PER_IMG = 5


def coco_like_jpegs(photos_dir: str, n: int, seed: int = 0) -> list:
  """n JPEG files' bytes as COCO stores them: long side 640, quality 90."""
  sources = []
  if photos_dir:
    paths = sorted(p for p in glob.glob(os.path.join(photos_dir, "*"))
                   if p.lower().endswith((".jpg", ".jpeg")))
    if not paths:
      raise SystemExit(f"--photos_dir={photos_dir}: no JPEG files")
    for p in paths:
      im = Image.open(p).convert("RGB")
      scale = COCO_LONG_SIDE / max(im.size)
      sources.append(im.resize((round(im.width * scale), round(im.height * scale)),
                               Image.BICUBIC))
  else:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    for _ in range(20):
      small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
      base = np.asarray(Image.fromarray(small).resize((640, 480), Image.BICUBIC), np.float32)
      cx, cy, r = rng.uniform(0, 640), rng.uniform(0, 480), rng.uniform(40, 200)
      blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None] * rng.uniform(-60, 60, 3)
      x = np.clip(base + blob + rng.normal(0, 12, (480, 640, 1)), 0, 255).astype(np.uint8)
      sources.append(Image.fromarray(x))
  out = []
  for i in range(n):
    buf = io.BytesIO()
    sources[i % len(sources)].save(buf, "JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def timed(fn, repeats: int) -> tuple:
  """(median wall s, median CPU s) of `repeats` calls after one warm-up."""
  fn()
  wall, cpu = [], []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
  return statistics.median(wall), statistics.median(cpu)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--photos_dir", default="")
  parser.add_argument("--images", type=int, default=320)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--output", default="")
  args = parser.parse_args()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  size, n = args.image_size, args.images

  coco = coco_like_jpegs(args.photos_dir, n)
  small = [images_lib.encode_image(images_lib.load_pil(b, size), "jpeg", 95) for b in coco]

  def prepro():
    for b in coco:
      images_lib.encode_image(images_lib.load_pil(b, size), "jpeg", 95)

  data = input_pipeline.SplitData(
      images=np.array(small, dtype=object),
      captions=np.ones((n, SEQ_PER_IMG, 16), np.int32), num_captions=np.full((n,), 5, np.int32),
      image_id=np.arange(n, dtype=np.int64), file_name=[f"{i}.jpg" for i in range(n)],
      objects=[None] * n, image_size=size, max_length=16)
  steps = n // BATCH
  stream = input_pipeline.train_dataset(data, BATCH, SEQ_PER_IMG, seed=0, threads=1)

  def train_input():  # one epoch from a fresh iterator (its prefetch cannot work ahead)
    for _ in stream.take(steps):
      pass

  decode_ds = tf.data.Dataset.from_tensor_slices(tf.constant(small)).map(
      lambda x: tf.io.decode_image(x, channels=3, expand_animations=False))
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = 1
  opts.threading.max_intra_op_parallelism = 1
  decode_ds = decode_ds.with_options(opts)

  def decode_only():
    for _ in decode_ds:
      pass

  kb = sum(len(b) for b in coco) / n / 1024
  kb_small = sum(len(b) for b in small) / n / 1024
  print(f"{n} images: COCO-like JPEGs {kb:.0f} KB on average "
        f"({'photos from ' + args.photos_dir if args.photos_dir else 'generated'}); "
        f"{size}x{size} records {kb_small:.0f} KB; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}", flush=True)
  rows = {}
  for name, fn, count in (("prepro", prepro, n), ("train_input", train_input, steps * BATCH),
                          ("decode_only", decode_only, n)):
    wall, cpu = timed(fn, args.repeats)
    rows[name] = {"images": count, "wall_s": wall, "cpu_s": cpu,
                  "images_per_s_wall": count / wall, "images_per_cpu_s": count / cpu}
    print(f"  {name:12s} {count / wall:8.0f} images/s (wall)  {count / cpu:8.0f} images per "
          f"CPU-second (one core)", flush=True)
  print(f"load average at the end {os.getloadavg()[0]:.1f}")
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump({"image_size": size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
