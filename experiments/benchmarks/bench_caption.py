"""Benchmark: captioning throughput (images/s) at beam sizes 1, 2 and 3.

  python experiments/benchmarks/bench_caption.py [--models=default,vgg16] \
      [--beams=1,2,3] [--batch_size=8] [--repeats=5] [--pipeline_files=64] [--json=OUT]

For each model (random weights; nothing to download):
  default  the embedded default config (SmallVGG, 64 px, LSTM 256, shapes-sized
           vocabulary of 70 words);
  vgg16    NeuralTalk2's model: VGG16 to fc7 on 224 px (resized to 256, center
           crop 224), LSTM 512, a COCO-sized vocabulary of 9487 words.
it times `inference.BatchCaptioner.raw` (the one jitted CNN + embedding +
decoding program on a fixed batch, host transfer and sync included): the
median of --repeats runs after a warm-up (the compile, timed separately),
as images/s and as a ratio against beam 1 measured in the same run. Captions
stop at END, so random weights decode at most max_length + 1 steps; the
decoder's share is reported by the ratio to beam 1 and a features-only run
(the CNN alone). For VGG16, which is compute-bound, the CNN's GFLOP/s are
given as a fraction of this CPU's float32 matmul peak, measured in the same
run, in the same rounds as the model (see `interleaved`).

With --pipeline_files=N it also captions N generated 640x480 JPEG files end to
end with `inference.caption_files` (default model): decoding in a thread pool
overlapped with compute, against decoding everything first and then
captioning (the serial sum).
"""

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from captionjax import configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from captionjax import inference  # pylint: disable=g-import-not-at-top,wrong-import-position
from captionjax.models import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from captionjax import vocab as vocab_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from captionjax.models.vgg import vgg16_flops  # pylint: disable=g-import-not-at-top,wrong-import-position

MAX_LENGTH = 16  # NeuralTalk2's default


def interleaved(fns: dict, repeats: int) -> dict:
  """name -> (median seconds, warm-up seconds) of each fn, timed in rounds.

  Every fn is warmed up (compiled) first; then each round runs every fn once,
  so that load from other processes on this shared CPU spreads over all of
  them alike and the ratios stay meaningful.
  """
  warm, times = {}, {k: [] for k in fns}
  for k, fn in fns.items():
    t = time.perf_counter()
    jax.block_until_ready(fn())
    warm[k] = time.perf_counter() - t
  for _ in range(repeats):
    for k, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t)
  return {k: (statistics.median(times[k]), warm[k]) for k in fns}


def matmul_fn(n: int = 2048):
  """(fn, flops): a jitted float32 n x n matmul, the CPU's practical peak."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  return (lambda: dot(a, b)), 2.0 * n ** 3


def make_model(name: str) -> inference.Model:
  config = configs.load_config("default")
  if name == "default":
    words, image_size = 70, config.shapes.image_size
  elif name == "vgg16":
    import ml_collections  # pylint: disable=g-import-not-at-top
    config.model.cnn = "vgg16"
    config.model.cnn_kwargs = ml_collections.ConfigDict({"output": "fc7"})
    config.model.attention = False  # one fc7 vector per image, as NeuralTalk2
    config.model.input_encoding_size = config.model.rnn_size = 512
    config.crop_size = 224
    words, image_size = 9487, 256
  else:
    raise ValueError(f"unknown model {name!r} (default, vgg16)")
  vocab = vocab_lib.Vocabulary([f"w{i}" for i in range(words - 1)])
  return inference.random_model(config, vocab, image_size, MAX_LENGTH)


def bench_model(name: str, beams, batch_size: int, repeats: int) -> list:
  """Rows of images/s for the CNN alone and each beam size, with the matmul peak
  timed in the same rounds."""
  model = make_model(name)
  s = model.input_size
  images = np.random.default_rng(0).integers(0, 256, (batch_size, s, s, 3), dtype=np.uint8)
  cnn = jax.jit(lambda p, bs, x: model.cnn.apply(build.cnn_variables(p, bs),
                                                 build.images_to_input(x), train=False))
  p_cnn = jax.device_put(model.params["cnn"])
  bs = jax.device_put(model.batch_stats)
  mm, mm_flops = matmul_fn()
  fns = {"matmul": mm, "cnn only": lambda: cnn(p_cnn, bs, images)}
  for k in beams:
    cap = inference.BatchCaptioner(model, batch_size=batch_size, beam_size=k)
    fns[k] = functools.partial(cap.raw, images)
  timing = interleaved(fns, repeats)
  peak = mm_flops / timing.pop("matmul")[0] / 1e9
  base = batch_size / timing[beams[0]][0]
  rows = []
  for k, (t, warm) in timing.items():
    r = {"model": name, "beam_size": k, "images_per_s": batch_size / t,
         "compile_s": max(warm - t, 0.0), "matmul_peak_gflops": peak}
    r["ratio_to_beam_%s" % beams[0]] = r["images_per_s"] / base
    if name == "vgg16":
      r["cnn_gflops_per_s"] = r["images_per_s"] * vgg16_flops(s) / 1e9
      r["fraction_of_matmul_peak"] = r["cnn_gflops_per_s"] / peak
    rows.append(r)
  return rows


def bench_pipeline(num_files: int, batch_size: int, repeats: int) -> dict:
  """End to end on JPEG files: prefetching decode overlapped vs serial."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  model = make_model("default")
  cap = inference.BatchCaptioner(model, batch_size=batch_size, beam_size=2)
  cap.compile()
  load = inference.image_loader(model)
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as d:
    paths = []
    for i in range(num_files):
      small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
      im = Image.fromarray(small).resize((640, 480), Image.BILINEAR)
      path = os.path.join(d, f"{i:05d}.jpg")
      im.save(path, quality=90)
      paths.append(path)

    def overlapped():
      return list(inference.caption_files(cap, paths, load, workers=2))

    def serial():
      imgs = np.stack([load(p)[0] for p in paths])
      return [cap(imgs[i:i + batch_size]) for i in range(0, len(imgs), batch_size)]

    def decode_only():
      return [load(p) for p in paths]

    t = interleaved({"overlapped": overlapped, "serial": serial, "decode": decode_only}, repeats)
  return {"files": num_files, "overlapped_images_per_s": num_files / t["overlapped"][0],
          "serial_images_per_s": num_files / t["serial"][0],
          "decode_only_images_per_s": num_files / t["decode"][0],
          "speedup_overlapped_vs_serial": t["serial"][0] / t["overlapped"][0]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="default,vgg16")
  parser.add_argument("--beams", default="1,2,3")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--pipeline_files", type=int, default=64, help="0 = skip")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args()
  beams = [int(b) for b in args.beams.split(",")]
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}", flush=True)
  rows = []
  for name in args.models.split(","):
    rows += bench_model(name, beams, args.batch_size, args.repeats)
  key = "ratio_to_beam_%s" % beams[0]
  print(f"{'model':8s} {'beam':>8s} {'images/s':>9s} {'ratio':>6s} {'compile s':>9s} "
        f"{'peak GF/s':>9s} {'of peak':>8s}")
  for r in rows:
    frac = f"{r['fraction_of_matmul_peak']:8.1%}" if "fraction_of_matmul_peak" in r else f"{'':8s}"
    print(f"{r['model']:8s} {str(r['beam_size']):>8s} {r['images_per_s']:9.2f} "
          f"{r[key]:6.2f} {r['compile_s']:9.1f} {r['matmul_peak_gflops']:9.1f} {frac}")
  out = {"device": jax.devices()[0].device_kind, "batch_size": args.batch_size,
         "repeats": args.repeats, "load_average": os.getloadavg()[0], "rows": rows}
  if args.pipeline_files:
    p = bench_pipeline(args.pipeline_files, args.batch_size, args.repeats)
    out["pipeline"] = p
    print(f"pipeline, default model, beam 2, {p['files']} 640x480 JPEGs: "
          f"overlapped {p['overlapped_images_per_s']:.1f} images/s, serial "
          f"{p['serial_images_per_s']:.1f} images/s ({p['speedup_overlapped_vs_serial']:.2f}x); "
          f"decoding alone {p['decode_only_images_per_s']:.1f} images/s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
