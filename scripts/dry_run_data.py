"""Stand-ins for the downloads of scripts/02_data.sh, for its --dry_run.

  python scripts/dry_run_data.py --output=DIR [--image_size=32]

Writes into DIR small files with the layout of the real ones, and
DIR/downloads.tsv, the table 02_data.sh fetches from (file:// URLs, sizes,
sha256 sums), in place of scripts/downloads.tsv:
  train2014.zip, val2014.zip  COCO's image archives: train2014/COCO_train2014_*.jpg
                              and val2014/COCO_val2014_*.jpg, random-sized JPEGs;
  caption_datasets.zip        Karpathy's splits: dataset_coco.json ("images" with
                              filepath, filename, split train/restval/val/test,
                              sentences with tokens and raw text, cocoid);
  vgg16_weights_tf_dim_ordering_tf_kernels.h5
                              VGG16 with random weights in Keras's legacy HDF5
                              layout, its fc1 sized for --image_size (the real
                              file's fc1 takes 224-pixel images' 7x7x512).
Nothing is downloaded. Running it again rewrites nothing (the table is
written last: its presence means the set is complete).
"""

import argparse
import hashlib
import io
import json
import os
import sys
import zipfile

import numpy as np

TEMPLATES = ("a man riding a wave on top of a surfboard", "a plate of food with broccoli and rice",
             "two dogs playing with a frisbee in the grass", "a red bus parked on the side of a street",
             "a cat sitting on a wooden bench", "a group of people standing in a kitchen")
# Karpathy's splits in miniature: train from train2014; restval, val and test from val2014.
SPLITS = (("train", "train2014", 6), ("restval", "val2014", 2), ("val", "val2014", 4),
          ("test", "val2014", 4))
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels.h5"


def jpeg(rng, h: int, w: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float64)
  x = np.kron(coarse, np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w]
  x = np.clip(x + rng.normal(0, 20, x.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(x).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def coco_archives(out: str, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  images, zips = [], {}
  for k, (split, folder, n) in enumerate(SPLITS):
    for i in range(n):
      cocoid = 1000 * (k + 1) + i
      name = f"COCO_{folder}_{cocoid:012d}.jpg"
      h, w = rng.integers(40, 120, 2)
      zips.setdefault(folder, []).append((f"{folder}/{name}", jpeg(rng, int(h), int(w))))
      sentences = []
      for j in range(5):
        raw = TEMPLATES[(i + j + k) % len(TEMPLATES)]
        sentences.append({"tokens": raw.split(), "raw": raw.capitalize() + ".",
                          "imgid": len(images), "sentid": 5 * len(images) + j})
      images.append({"filepath": folder, "filename": name, "split": split, "cocoid": cocoid,
                     "imgid": len(images), "sentids": [s["sentid"] for s in sentences],
                     "sentences": sentences})
  for folder, members in zips.items():
    with zipfile.ZipFile(os.path.join(out, f"{folder}.zip"), "w") as z:
      for name, data in members:
        z.writestr(name, data)
  with zipfile.ZipFile(os.path.join(out, "caption_datasets.zip"), "w",
                       zipfile.ZIP_DEFLATED) as z:
    z.writestr("dataset_coco.json", json.dumps({"images": images, "dataset": "coco"}))


def keras_vgg16_h5(path: str, image_size: int, seed: int = 1) -> None:
  """Random VGG16 weights in Keras's legacy layout (root attribute layer_names;
  per layer group the attribute weight_names, datasets LAYER/kernel:0, LAYER/bias:0)."""
  import h5py  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  layers, c_in = [("input_1", None)], 3
  for b, widths in enumerate(VGG16_BLOCKS, start=1):
    for i, width in enumerate(widths, start=1):
      layers.append((f"block{b}_conv{i}", (3, 3, c_in, width)))
      c_in = width
    layers.append((f"block{b}_pool", None))
  side = image_size // 32
  layers += [("flatten", None), ("fc1", (side * side * 512, 4096)), ("fc2", (4096, 4096)),
             ("predictions", (4096, 1000))]
  tmp = path + ".tmp"
  with h5py.File(tmp, "w") as f:
    f.attrs["layer_names"] = [name.encode() for name, _ in layers]
    f.attrs["backend"] = b"tensorflow"
    for name, shape in layers:
      g = f.create_group(name)
      if shape is None:
        g.attrs["weight_names"] = []
        continue
      fan_in = int(np.prod(shape[:-1]))
      kernel = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
      bias = 0.01 * rng.standard_normal(shape[-1:], np.float32)
      g.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
      g[f"{name}/kernel:0"] = kernel
      g[f"{name}/bias:0"] = bias
  os.replace(tmp, path)


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--output", required=True)
  p.add_argument("--image_size", type=int, default=32,
                 help="the prepro image size the VGG16 stand-in's fc1 is sized for")
  args = p.parse_args(argv)
  table = os.path.join(args.output, "downloads.tsv")
  if os.path.exists(table):
    print(f"{table}: stand-ins written already")
    return 0
  if args.image_size % 32:
    p.error("--image_size must be a multiple of 32 (VGG16's 5 pools)")
  os.makedirs(args.output, exist_ok=True)
  coco_archives(args.output)
  keras_vgg16_h5(os.path.join(args.output, WEIGHTS_FILE), args.image_size)
  rows = []
  for name in ("train2014.zip", "val2014.zip", "caption_datasets.zip", WEIGHTS_FILE):
    path = os.path.abspath(os.path.join(args.output, name))
    rows.append(f"{name}\tfile://{path}\t{os.path.getsize(path)}\tsha256:{sha256(path)}")
  with open(table + ".tmp", "w", encoding="utf-8") as f:
    f.write("# name\turl\tbytes\tchecksum (stand-ins for scripts/downloads.tsv)\n")
    f.write("\n".join(rows) + "\n")
  os.replace(table + ".tmp", table)
  print(f"{table}: {len(rows)} stand-in downloads")
  return 0


if __name__ == "__main__":
  sys.exit(main())
