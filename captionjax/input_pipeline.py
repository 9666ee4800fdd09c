"""tf.data input pipeline: prepro records -> static-shape numpy batches.

A split is loaded into memory once (decoded when small, else as encoded
bytes decoded on the fly). Training streams examples through a stateless
per-epoch permutation (`index_shuffle`), so the stream is a pure function of
(seed, position): resuming at position p gives exactly the batches an
uninterrupted run sees, in O(1). All randomness (caption choice, crop, flip)
is stateless and keyed on the example's position in the stream.

Batch layout (B images, S = seq_per_img captions each, L = max_length + 2):
  image     uint8   [B, H, W, 3]
  captions  int32   [B, S, L]   [0, w1 .. wn, 0, ...] (0 = START/END/pad)
  mask      float32 [B, S, L]   1 at positions 1..n+1 (the prediction targets)
  image_id  int64   [B]
  index     int64   [B]         position in the split (eval) or the stream
  row       int64   [B]         the example's row in the split (for side arrays)
  _mask     float32 [B]         evaluation only: 1 for real examples, 0 for padding
"""

import dataclasses
import json
import os

import numpy as np

from captionjax import records

# Splits whose decoded images fit in this many bytes are decoded once.
DECODED_CACHE_BYTES = 2 << 30
_SEED_MIX = 0x9E3779B9  # separates the stream's RNG uses


def _tf():
  """TensorFlow, kept off GPUs (JAX owns them) and out of JAX's way."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not getattr(_tf, "done", False):
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
      pass  # already initialized; nothing to hide
    _tf.done = True
  return tf


@dataclasses.dataclass
class SplitData:
  """One split in host memory.

  images:    uint8 [N, H, W, 3] when decoded, else object [N] of encoded bytes
  captions:  int32 [N, C, max_length] (C = most captions of any image, 0-padded)
  num_captions: int32 [N]
  image_id:  int64 [N]
  file_name: list[str]
  objects:   list (JSON value or None per image)
  """
  images: np.ndarray
  captions: np.ndarray
  num_captions: np.ndarray
  image_id: np.ndarray
  file_name: list
  objects: list
  image_size: int
  max_length: int

  def __len__(self):
    return len(self.image_id)

  @property
  def decoded(self) -> bool:
    return self.images.dtype == np.uint8


def load_split(data_dir: str, split: str, decode: bool | None = None) -> SplitData:
  """Reads every record of `split` into memory."""
  info = records.load_info(data_dir)
  files = records.split_files(data_dir, split)
  if not files:
    have = ", ".join(info["splits"])
    raise FileNotFoundError(f"{data_dir}: no records for split {split!r} (have: {have})")
  tf = _tf()
  max_length, size = info["max_length"], info["image_size"]
  n = info["splits"][split]
  if decode is None:
    decode = n * size * size * 3 <= DECODED_CACHE_BYTES
  spec = records.feature_spec()

  def parse(x):
    ex = tf.io.parse_single_example(x, spec)
    caps = tf.reshape(tf.sparse.to_dense(ex["captions"]), [-1, max_length])
    out = dict(ex, captions=tf.cast(caps, tf.int32))
    if decode:
      img = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
      out["image"] = tf.ensure_shape(img, [size, size, 3])
    return out

  ds = tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=2)
  imgs, caps, ncap, ids, names, objs = [], [], [], [], [], []
  try:
    for ex in ds.as_numpy_iterator():
      imgs.append(ex["image"])
      caps.append(ex["captions"])
      ncap.append(int(ex["num_captions"]))
      ids.append(int(ex["image_id"]))
      names.append(ex["file_name"].decode("utf-8"))
      objs.append(json.loads(ex["objects"]) if ex["objects"] else None)
  except tf.errors.OpError as e:
    raise _damaged(data_dir, split, e) from None
  c = max(x.shape[0] for x in caps)
  padded = np.zeros((len(caps), c, max_length), np.int32)
  for i, x in enumerate(caps):
    padded[i, :x.shape[0]] = x
  images = np.stack(imgs) if decode else np.array(imgs, dtype=object)
  return SplitData(images, padded, np.array(ncap, np.int32), np.array(ids, np.int64),
                   names, objs, size, max_length)


def _damaged(data_dir: str, split: str, e) -> ValueError:
  msg = str(getattr(e, "message", e)).strip().splitlines()
  return ValueError(f"{data_dir}: the records of split {split!r} are damaged "
                    f"({type(e).__name__}: {msg[0] if msg else ''}); run prepro again "
                    "(--force) to rewrite them")


def check_splits(data_dir: str, splits) -> None:
  """ValueError unless every record of `splits` (those the data set has) reads back.

  A quick pass, nothing decoded: the trainer checks its test splits at the
  start, so that a damaged file fails the run before training, not after it.
  """
  info, tf = records.load_info(data_dir), _tf()
  for split in sorted(set(splits) & set(info["splits"])):
    try:
      n = sum(1 for _ in tf.data.TFRecordDataset(records.split_files(data_dir, split)))
    except tf.errors.OpError as e:
      raise _damaged(data_dir, split, e) from None
    if n != info["splits"][split]:
      raise ValueError(f"{data_dir}: split {split!r} has {n} records, dataset_info.json says "
                       f"{info['splits'][split]}; run prepro again (--force)")


# ------------------------------------------------ preprocessing ops (dict -> dict)
# Each works eagerly and inside tf.data; `seed` is a stateless seed [2].


def data_dir_for(config) -> str:
  """The prepro directory of the configured data set (generating shapes if needed)."""
  if config.dataset == "shapes":
    from captionjax import shapes  # pylint: disable=g-import-not-at-top
    s = config.shapes
    cache = s.cache_dir or os.environ.get(
        "CAPTIONJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "captionjax"))
    splits = {"train": s.num_train, "val": s.num_val, "test": s.num_test, "novel": s.num_novel}
    name = (f"shapes-v{shapes.VERSION}-{s.image_size}px-seed{s.seed}-"
            + "-".join(str(v) for v in splits.values()))
    return shapes.prepare(os.path.join(cache, name), splits, s.image_size, s.seed)
  if not os.path.isdir(config.dataset):
    raise FileNotFoundError(f"dataset {config.dataset!r}: no such directory "
                            "(give 'shapes' or the output directory of `captionjax prepro`)")
  return config.dataset


def load_config_split(config, data_dir: str, split: str) -> SplitData:
  """load_split, with the config's `blank_images` ablation (every image black)."""
  data = load_split(data_dir, split)
  if config.blank_images:
    data.images = np.zeros_like(data.images) if data.decoded else data.images
    if not data.decoded:
      raise ValueError("blank_images needs a data set small enough to decode in memory")
  return data


def select_captions(ex: dict, seq_per_img: int, seed=None) -> dict:
  """Picks `seq_per_img` of the image's captions: a random subset in training
  (with replacement when it has fewer), the first ones (cycled) when seed is None."""
  tf = _tf()
  n = tf.maximum(tf.cast(ex["num_captions"], tf.int32), 1)
  if seed is None:
    idx = tf.range(seq_per_img) % n
  else:
    perm = tf.argsort(tf.random.stateless_uniform([tf.shape(ex["captions"])[0]], seed))
    perm = tf.boolean_mask(perm, perm < n)
    extra = tf.random.stateless_uniform([seq_per_img], seed + 1, maxval=n, dtype=tf.int32)
    idx = tf.where(tf.range(seq_per_img) < n, tf.gather(perm, tf.minimum(tf.range(seq_per_img), n - 1)), extra)
  return dict(ex, captions=tf.gather(ex["captions"], idx))


def add_start_end(ex: dict) -> dict:
  """captions [S, max_length] -> [S, max_length + 2] with START/END, plus the mask."""
  tf = _tf()
  caps = ex["captions"]
  s = tf.shape(caps)[0]
  zeros = tf.zeros([s, 1], caps.dtype)
  full = tf.concat([zeros, caps, zeros], axis=1)
  length = tf.reduce_sum(tf.cast(caps > 0, tf.int32), axis=1)  # words per caption
  pos = tf.range(tf.shape(full)[1])[None, :]
  mask = tf.cast((pos >= 1) & (pos <= length[:, None] + 1), tf.float32)
  return dict(ex, captions=full, mask=mask)


def crop_flip(ex: dict, crop_size: int, flip: bool, seed=None) -> dict:
  """Random crop (and optional horizontal flip) with a seed; center crop without."""
  tf = _tf()
  img = ex["image"]
  if crop_size:
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    if seed is None:
      y, x = (h - crop_size) // 2, (w - crop_size) // 2
    else:
      y = tf.random.stateless_uniform([], seed, maxval=h - crop_size + 1, dtype=tf.int32)
      x = tf.random.stateless_uniform([], seed + 2, maxval=w - crop_size + 1, dtype=tf.int32)
    img = tf.slice(img, [y, x, 0], [crop_size, crop_size, 3])
  if flip and seed is not None:
    do = tf.random.stateless_uniform([], seed + 3) < 0.5
    img = tf.cond(do, lambda: tf.reverse(img, [1]), lambda: img)
  return dict(ex, image=img)


# ------------------------------------------------ datasets


def _example_fn(data: SplitData):
  """index -> the raw example dict, gathering from the in-memory split."""
  tf = _tf()
  images = tf.constant(data.images) if data.decoded else tf.constant(list(data.images))
  caps, ncap = tf.constant(data.captions), tf.constant(data.num_captions)
  ids = tf.constant(data.image_id)
  size = data.image_size

  def get(i):
    img = images[i]
    if not data.decoded:
      img = tf.ensure_shape(tf.io.decode_image(img, channels=3, expand_animations=False),
                            [size, size, 3])
    return {"image": img, "captions": caps[i], "num_captions": ncap[i], "image_id": ids[i]}
  return get


def _options(ds, threads: int):
  tf = _tf()
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.private_threadpool_size = threads
  opts.threading.max_intra_op_parallelism = 1
  return ds.with_options(opts)


def train_dataset(data: SplitData, batch_size: int, seq_per_img: int, seed: int,
                  start: int = 0, crop_size: int = 0, flip: bool = False,
                  process_index: int = 0, process_count: int = 1, threads: int = 2):
  """An endless stream of training batches, starting at position `start`.

  Each of the `process_count` processes reads `batch_size` rows of every global
  batch of batch_size * process_count, process p the p-th block: its position
  k is global stream position g = (k // batch_size * process_count + p) *
  batch_size + k % batch_size, so the global batches (and every example's
  random choices) do not depend on the number of processes. Epoch e = g // N
  visits the split in the permutation index_shuffle(seed, e).
  """
  tf = _tf()
  n = len(data)
  get = _example_fn(data)

  def element(k):
    g = (k // batch_size * process_count + process_index) * batch_size + k % batch_size
    epoch, within = g // n, g % n
    i = tf.random.experimental.index_shuffle(within, [seed, epoch], n - 1)
    ex = get(i)
    rng = tf.stack([tf.cast(seed ^ _SEED_MIX, tf.int64), g])
    ex = select_captions(ex, seq_per_img, rng)
    ex = add_start_end(ex)
    ex = crop_flip(ex, crop_size, flip, rng + 7)
    ex["index"] = g
    ex["row"] = i
    del ex["num_captions"]
    return ex

  ds = tf.data.Dataset.range(start, 2**62).map(element, num_parallel_calls=threads)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
  return _options(ds, threads)


def eval_batches(data: SplitData, batch_size: int, seq_per_img: int, crop_size: int = 0,
                 threads: int = 2, limit: int | None = None):
  """Every example of the split, in order, in full batches; padding has `_mask` 0."""
  tf = _tf()
  get = _example_fn(data)
  n = len(data) if limit is None else min(limit, len(data))

  def element(i):
    ex = add_start_end(select_captions(get(i), seq_per_img))
    ex = crop_flip(ex, crop_size, False)
    ex["index"] = i
    ex["row"] = i
    del ex["num_captions"]
    return ex

  ds = tf.data.Dataset.range(n).map(element, num_parallel_calls=threads)
  ds = _options(ds.batch(batch_size).prefetch(2), threads)
  for batch in ds.as_numpy_iterator():
    yield pad_batch(batch, batch_size)


def pad_batch(batch: dict, batch_size: int) -> dict:
  """Pads a short last batch to `batch_size` (repeating its first row); adds `_mask`."""
  b = len(next(iter(batch.values())))
  out = {k: np.concatenate([v, np.repeat(v[:1], batch_size - b, axis=0)]) if b < batch_size else v
         for k, v in batch.items()}
  out["_mask"] = (np.arange(batch_size) < b).astype(np.float32)
  return out


class TrainIterator:
  """Numpy batches from `train_dataset`, with a position that can be saved."""

  def __init__(self, data: SplitData, batch_size: int, **kwargs):
    self._data, self._batch_size, self._kwargs = data, batch_size, kwargs
    self.position = kwargs.pop("start", 0)
    self._it = None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      ds = train_dataset(self._data, self._batch_size, start=self.position, **self._kwargs)
      self._it = ds.as_numpy_iterator()
    batch = next(self._it)
    self.position += self._batch_size
    return batch

  def get_state(self) -> dict:
    return {"position": int(self.position)}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])
    self._it = None
