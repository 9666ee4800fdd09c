"""Benchmark: `captionjax prepro` throughput vs a bare two-process PIL loop.

  python experiments/benchmarks/bench_prepro.py [--images=400] [--size=640x480]
      [--image_size=256] [--workers=2] [--repeats=5] [--photos_dir=DIR] [--cli]

Generates `--images` photo-like JPEGs (smooth shapes plus texture, about the
size and file weight of COCO's), then times on those same files, interleaved,
a median of `--repeats` runs after one warm-up each:

  prepro      `captionjax.prepro.prepro` in this process (force=True: no
              up-to-date shortcut): decode, resize, re-encode (JPEG q95),
              vocabulary, TFRecord shards, references;
  bare        a `multiprocessing` pool of `--workers` processes doing only
              `Image.open(p).convert("RGB").resize((S, S), BICUBIC)`;
  bare+draft  the same with JPEG draft (DCT-domain) downscaling, the fastest
              a bare PIL loop gets.

Both pools are created inside the timed region with the same start method
(spawn, as prepro uses). It prints images per second for each and the ratios
prepro / bare and prepro / bare+draft. With `--photos_dir` the files of that
folder are used instead (copied, cycled to `--images` files). With `--cli` it also times one fresh
`captionjax prepro` process (Python, TensorFlow import and all) on the files.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from captionjax import prepro

CAPTIONS = ["a dog runs on the grass", "two people walk down a street",
            "a man rides a bike near a building", "a cat sits on a red sofa",
            "children play with a ball in a park"]


def make_images(root: str, n: int, width: int, height: int, seed: int = 0) -> list[str]:
  """Photo-like JPEGs: a smooth colour field, soft shapes and fine texture."""
  rng = np.random.default_rng(seed)
  paths = []
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  for i in range(n):
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
    cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(40, 200)
    blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None] * rng.uniform(-60, 60, 3)
    texture = rng.normal(0, 12, size=(height, width, 1))
    a = np.clip(base + blob + texture, 0, 255).astype(np.uint8)
    path = os.path.join(root, f"img_{i:05d}.jpg")
    Image.fromarray(a).save(path, "JPEG", quality=90)
    paths.append(path)
  return paths


def _bare(job):
  path, size = job
  im = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
  return np.asarray(im).shape


def _bare_draft(job):
  path, size = job
  im = Image.open(path)
  im.draft("RGB", (size, size))
  im = im.convert("RGB").resize((size, size), Image.BICUBIC)
  return np.asarray(im).shape


def run_bare(fn, paths, size, workers):
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    for _ in pool.imap(fn, [(p, size) for p in paths], chunksize=16):
      pass


def run_prepro(items, root, out, size, workers):
  prepro.prepro(items, out, images_root=root, num_val=len(items) // 10,
                num_test=len(items) // 10, word_count_threshold=0, image_size=size,
                num_workers=workers, progress=False, force=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=400)
  parser.add_argument("--size", default="640x480", help="generated images, WxH")
  parser.add_argument("--image_size", type=int, default=256, help="prepro's --image_size")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--cli", action="store_true", help="also time one `captionjax prepro`")
  parser.add_argument("--photos_dir", default="", help="use these image files, not generated ones")
  args = parser.parse_args()
  width, height = (int(v) for v in args.size.split("x"))

  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "images")
    os.makedirs(root)
    t = time.perf_counter()
    if args.photos_dir:
      photos = sorted(os.listdir(args.photos_dir))
      paths = []
      for i in range(args.images):
        name = photos[i % len(photos)]
        paths.append(os.path.join(root, f"{i:05d}_{name}"))
        shutil.copyfile(os.path.join(args.photos_dir, name), paths[-1])
      width, height = 0, 0
    else:
      paths = make_images(root, args.images, width, height)
    mb = sum(os.path.getsize(p) for p in paths) / 2 ** 20
    what = f"files from {args.photos_dir}" if args.photos_dir else f"{width}x{height} JPEGs"
    print(f"{len(paths)} {what} ({mb / len(paths) * 1024:.0f} KiB "
          f"each) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    items = [{"file_path": os.path.basename(p), "captions": CAPTIONS} for p in paths]
    out = os.path.join(tmp, "out")
    runs = {
        "prepro": lambda: run_prepro(items, root, out, args.image_size, args.workers),
        "bare": lambda: run_bare(_bare, paths, args.image_size, args.workers),
        "bare+draft": lambda: run_bare(_bare_draft, paths, args.image_size, args.workers),
    }
    times = {k: [] for k in runs}
    for fn in runs.values():  # warm-up (prepro: imports TensorFlow once)
      fn()
    for _ in range(args.repeats):  # interleaved: load changes hit all alike
      for k, fn in runs.items():
        t = time.perf_counter()
        fn()
        times[k].append(time.perf_counter() - t)
    result = {"images": len(paths), "size": args.photos_dir or args.size, "image_size": args.image_size,
              "workers": args.workers, "cpu_count": os.cpu_count(), "repeats": args.repeats}
    for k, ts in times.items():
      med = statistics.median(ts)
      result[f"{k}_s"] = round(med, 3)
      result[f"{k}_images_per_s"] = round(len(paths) / med, 1)
      print(f"{k:>11}: median {med:.2f} s of {[round(x, 2) for x in ts]} -> "
            f"{len(paths) / med:.1f} images/s", file=sys.stderr)
    result["ratio_vs_bare"] = round(result["bare_s"] / result["prepro_s"], 3)
    result["ratio_vs_bare_draft"] = round(result["bare+draft_s"] / result["prepro_s"], 3)
    if args.cli:
      cli_out = os.path.join(tmp, "cli_out")
      t = time.perf_counter()
      subprocess.run([sys.executable, "-m", "captionjax.cli", "prepro",
                      f"--input_json={_write_raw(tmp, items)}", f"--images_root={root}",
                      f"--output_dir={cli_out}", f"--num_workers={args.workers}",
                      f"--image_size={args.image_size}", "--word_count_threshold=0",
                      f"--num_val={len(items) // 10}", f"--num_test={len(items) // 10}",
                      "--no_progress", "--force"], check=True, capture_output=True)
      dt = time.perf_counter() - t
      result["cli_s"] = round(dt, 2)
      result["cli_images_per_s"] = round(len(paths) / dt, 1)
    print(json.dumps(result))


def _write_raw(tmp, items):
  path = os.path.join(tmp, "raw.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(items, f)
  return path


if __name__ == "__main__":
  main()
