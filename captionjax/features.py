"""`captionjax features`: VGG16 fc7 features of a folder of images.

    captionjax features --weights=weights/vgg16 --images=FOLDER --output=feats.npy

NeuralTalk's feature workflow: every image file directly in FOLDER (hidden
files skipped), in sorted file-name order, is decoded (captionjax.images:
EXIF orientation, grayscale, alpha and the rest), resized to 224x224 (bicubic,
aspect ratio not kept, as NeuralTalk2; a 224x224 image passes unchanged) and
run through the imported VGG16 (`captionjax import-weights`) with the input
normalization its weights expect. Outputs:
  FILE.npy          float32 [N, 4096]: fc7 after its ReLU, row i for name i
  FILE.names.json   the N file names (relative to FOLDER), row order
(FILE is --output without ".npy"). A file that is not a readable image is
skipped with a one-line message and left out of both.

Dimensions: B images per batch, N images.
"""

import concurrent.futures
import json
import os
import sys
import time

import numpy as np

from captionjax import images as images_lib
from captionjax import weights as weights_lib

IMAGE_SIZE = 224  # VGG16's input size (fc6 is fixed to a 7x7 map)


def add_arguments(p):
  p.add_argument("--weights", required=True, help="directory written by `captionjax import-weights`")
  p.add_argument("--images", required=True, help="folder of images (not recursive)")
  p.add_argument("--output", required=True, help="FILE.npy; FILE.names.json is written beside it")
  p.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
  p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                 help="threads that decode and resize images")


def run(args) -> int:
  try:
    names = extract_to_file(args.weights, args.images, args.output, args.batch_size,
                            args.num_workers)
  except (weights_lib.WeightsError, FileNotFoundError, NotADirectoryError, ValueError) as e:
    print(f"captionjax features: error: {e}", file=sys.stderr)
    return 2
  return 0 if names else 1


def names_path(output: str) -> str:
  """FILE.npy -> FILE.names.json."""
  base = output[:-len(".npy")] if output.endswith(".npy") else output
  return base + ".names.json"


def list_images(folder: str) -> list[str]:
  """The non-hidden regular files directly in `folder`, sorted by name."""
  if not os.path.isdir(folder):
    raise NotADirectoryError(f"--images={folder}: no such folder")
  return sorted(n for n in os.listdir(folder)
                if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))


def make_extractor(weights_dir: str, batch_size: int):
  """fn(uint8 [B, 224, 224, 3]) -> fc7 float32 [B, 4096], one jitted program."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from captionjax.models.vgg import VGG16  # pylint: disable=g-import-not-at-top
  model = VGG16(output="fc7", **weights_lib.model_kwargs(weights_dir))
  x = jnp.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  like = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  params = jax.device_put(weights_lib.load_params(weights_dir, like))
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x.astype(jnp.float32) / 255.0))
  return lambda batch: np.asarray(fwd(params, batch))


def extract(extract_fn, folder: str, names: list[str], batch_size: int, num_workers: int = 1,
            progress: bool = True):
  """(features [N, 4096], kept names): fc7 of each readable image, in order."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  def load(name):
    try:
      return images_lib.load_image(os.path.join(folder, name), size=IMAGE_SIZE)
    except images_lib.ImageError as e:
      print(f"skipping {os.path.join(folder, name)}: {e}", file=sys.stderr)
      return None

  feats, kept = [], []
  with concurrent.futures.ThreadPoolExecutor(max(num_workers, 1)) as pool, \
      tqdm(total=len(names), unit="img", disable=not progress, dynamic_ncols=True) as bar:
    for start in range(0, len(names), batch_size):
      chunk = names[start:start + batch_size]
      loaded = [(n, im) for n, im in zip(chunk, pool.map(load, chunk)) if im is not None]
      bar.update(len(chunk))
      if not loaded:
        continue
      batch = np.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)  # padded: one shape
      batch[:len(loaded)] = np.stack([im for _, im in loaded])
      feats.append(extract_fn(batch)[:len(loaded)])  # -> [b, 4096]
      kept.extend(n for n, _ in loaded)
  out = np.concatenate(feats) if feats else np.zeros((0, 4096), np.float32)
  return out.astype(np.float32), kept


def extract_to_file(weights_dir: str, folder: str, output: str, batch_size: int = 8,
                    num_workers: int = 1, progress: bool = True) -> list[str]:
  """Writes OUTPUT (.npy) and its .names.json; returns the names kept."""
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}: must be at least 1")
  if not output.endswith(".npy"):
    raise ValueError(f"--output={output}: must end in .npy")
  names = list_images(folder)
  if not names:
    raise FileNotFoundError(f"--images={folder}: no files")
  t0 = time.time()
  fn = make_extractor(weights_dir, batch_size)
  feats, kept = extract(fn, folder, names, batch_size, num_workers, progress)
  if not kept:
    print(f"captionjax features: error: {folder}: none of the {len(names)} files is a "
          "readable image", file=sys.stderr)
    return []
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  np.save(output, feats)
  with open(names_path(output), "w", encoding="utf-8") as f:
    json.dump(kept, f, ensure_ascii=False, indent=0)
  print(json.dumps({"output": output, "names": names_path(output), "images": len(kept),
                    "skipped": len(names) - len(kept), "shape": list(feats.shape),
                    "seconds": round(time.time() - t0, 1)}))
  return kept
