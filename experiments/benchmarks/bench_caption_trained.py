"""Benchmark: captioning throughput of a trained workdir on its own test split.

    python experiments/benchmarks/bench_caption_trained.py --workdir=runs/default

Images are already decoded (the split in memory), so this times the jitted
CNN + decoder alone: one compile per beam size, then the median of
`--repeats` passes over `--num_images` images after a warm-up batch.
`bench_caption.py` covers random weights, VGG16 and image decoding.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from captionjax import inference, input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished `captionjax train` workdir")
  p.add_argument("--split", default="test")
  p.add_argument("--beams", default="1,2,3")
  p.add_argument("--batch_size", type=int, default=100)
  p.add_argument("--num_images", type=int, default=500)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  model = inference.load_workdir(args.workdir)
  data = input_pipeline.load_split(input_pipeline.data_dir_for(model.config), args.split)
  n = min(args.num_images, len(data)) // args.batch_size * args.batch_size
  images = data.images[:n]
  rows = {}
  for beam in (int(b) for b in args.beams.split(",")):
    captioner = inference.BatchCaptioner(model, batch_size=args.batch_size, beam_size=beam)
    t0 = time.time()
    captioner.compile()
    compile_s = time.time() - t0
    captioner.raw(images[:args.batch_size])  # warm-up
    times = []
    for _ in range(args.repeats):
      t0 = time.time()
      for i in range(0, n, args.batch_size):
        captioner.raw(images[i:i + args.batch_size])
      times.append(time.time() - t0)
    rows[beam] = {"images_per_s": round(n / float(np.median(times)), 1),
                  "compile_s": round(compile_s, 2)}
    print(f"beam {beam}: {rows[beam]['images_per_s']:8.1f} images/s "
          f"(compile {compile_s:.1f} s)", flush=True)
  print(json.dumps({"workdir": args.workdir, "images": n, "batch_size": args.batch_size,
                    "beams": rows}))


if __name__ == "__main__":
  main()
