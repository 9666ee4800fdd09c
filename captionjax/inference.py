"""A trained captioner for inference: load a workdir, caption batches of images.

    model = inference.load_workdir("runs/default")  # the latest checkpoint
    captioner = inference.BatchCaptioner(model, batch_size=16, beam_size=2)
    # or: options=decode.DecodeOptions(...), a list of models for an ensemble
    for item in inference.caption_files(captioner, paths):
      print(item.path, item.captions[0] if item.ok else item.error)

Images go through ONE jitted program (CNN, image embedding and decoding) per
fixed batch shape: the last batch is padded, so nothing recompiles. Files are
decoded by a thread pool that works ahead of the model, overlapping image
decoding with compute.

Also here: the perplexity of reference captions under a model, as NeuralTalk
reports it (exp of the mean per-token cross-entropy, END included).

Dimensions: B images per batch, K beams, T tokens per caption, S model input
size (pixels a side), C captions per image, L = max_length + 2, V vocabulary.
"""

import collections
import concurrent.futures
import dataclasses
import json
import os
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from captionjax import checkpoints
from captionjax import images as images_lib
from captionjax import parallel
from captionjax import vocab as vocab_lib
from captionjax.models import build

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"


class CheckpointError(ValueError):
  """A workdir that cannot be loaded; str(e) is a one-line reason naming it."""


@dataclasses.dataclass
class Model:
  """A captioner ready for inference (parameters in host memory)."""
  config: object  # ml_collections.ConfigDict of the training run
  vocab: vocab_lib.Vocabulary
  cnn: object  # flax module: images -> features [B, D]
  lm: object  # flax Captioner with cnn="none": features -> captions (or the alignment model)
  params: dict  # {"cnn", "img_embed", "lm"} (the alignment model's: models/ranking.SCORE_KEYS)
  batch_stats: dict  # the CNN's BatchNorm statistics ({} for VGG16)
  image_size: int  # images are resized to this square (as prepro does)
  input_size: int  # then center-cropped to this (the config's crop_size) for the CNN
  max_length: int  # most words in a caption (decoding runs max_length + 1 steps)
  step: int = 0  # the checkpoint's global step
  workdir: str = ""

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """uint8 [image_size, image_size, 3] -> center crop [S, S, 3]."""
    return center_crop(image, self.input_size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central size x size window of [H, W, 3] (as the input pipeline's eval crop)."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  y, x = (h - size) // 2, (w - size) // 2
  return image[y:y + size, x:x + size]


def square_crop(image: np.ndarray) -> np.ndarray:
  """NeuralTalk2's video crop: the central min(H, W) square of [H, W, 3]."""
  h, w = image.shape[:2]
  return center_crop(image, min(h, w)) if h != w else image


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [size, size, 3], bicubic (as load_image resizes)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


# ---------------------------------------------------------------- loading


def _read_json(path: str, what: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no {what} (is this a `captionjax train` workdir?)") from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read {what} ({e})") from None


def _image_geometry(config, meta: dict) -> Tuple[int, int]:
  """(image_size, max_length) of the training data, from the checkpoint or the data set."""
  if "image_size" in meta and "max_length" in meta:
    return int(meta["image_size"]), int(meta["max_length"])
  # Older checkpoints: ask the data set (its info.json, or the shapes generator's settings).
  from captionjax import records  # pylint: disable=g-import-not-at-top
  data_dir = config.dataset
  if config.dataset == "shapes":
    from captionjax import shapes  # pylint: disable=g-import-not-at-top
    return int(config.shapes.image_size), int(shapes.MAX_WORDS)
  try:
    info = records.load_info(data_dir)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"the checkpoint does not record its image size and the data set "
                          f"{data_dir!r} is not readable ({e})") from None
  return int(info["image_size"]), int(info["max_length"])


def load_workdir(workdir: str, step: Optional[int] = None,
                 kinds: Optional[Sequence[str]] = ("captioner",)) -> Model:
  """Loads a `captionjax train` workdir's checkpoint (the latest, or `step`).

  `kinds`: the model kinds (config.model.kind) accepted (None: any); with a
  ranking run, `lm` is the alignment model and `params` hold its parameters.

  Raises:
    CheckpointError: not a workdir, no checkpoint, another kind of model, or
      a checkpoint of the CNN pretraining phase (no language model yet).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    raise CheckpointError(f"--checkpoint={workdir}: no such directory")
  config = ml_collections.ConfigDict(
      _read_json(os.path.join(workdir, CONFIG_FILE), "config.json"))
  try:
    kind = build.model_kind(config)
  except ValueError as e:
    raise CheckpointError(f"{workdir}: {e}") from None
  if kinds is not None and kind not in kinds:
    raise CheckpointError(f"{workdir}: holds a {kind} model" + (
        " (image-sentence ranking, no captions): use `captionjax rank`" if kind == "ranking"
        else f", not a {' or '.join(kinds)} model"))
  try:
    vocab = vocab_lib.Vocabulary.load(os.path.join(workdir, VOCAB_FILE))
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise CheckpointError(f"{workdir}: no checkpoints/ directory (training has not saved one yet)")
  ckpt = checkpoints.Checkpointer(workdir, keep=10**6)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{ckpt.directory}: no checkpoint saved yet")
    meta = ckpt.restore_meta(step)
    if meta.get("phase") == checkpoints.PHASE_PRETRAIN:
      raise CheckpointError(
          f"{ckpt.directory}/{step}: a CNN-pretraining checkpoint (no language model yet); "
          "let training reach the caption phase")
    state = ckpt.restore(step, None)  # no target: the tree as saved, numpy arrays
  except CheckpointError:
    raise
  except Exception as e:  # orbax raises many kinds on missing or damaged files
    raise CheckpointError(f"{ckpt.directory}: cannot restore step {step} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  finally:
    ckpt.manager.close()
  if meta.get("vocab_size", len(vocab)) != len(vocab):
    raise CheckpointError(f"{workdir}: vocab.json has {len(vocab)} words, the checkpoint "
                          f"{meta.get('vocab_size')}")
  digest = meta.get("vocab_digest")
  if digest is not None and digest != checkpoints.vocab_digest(vocab.words):
    raise CheckpointError(f"{os.path.join(workdir, VOCAB_FILE)}: not the vocabulary checkpoint "
                          f"{step} was trained with (same size, other words)")
  if meta.get("config"):  # the config this step was trained with (config.json is the latest run's)
    config = ml_collections.ConfigDict(meta["config"])
  image_size, max_length = _image_geometry(config, meta)
  cnn, lm, _ = build.make_models(config, len(vocab))
  params, keys = state["params"], ("cnn",) + build.head_keys(config)
  if not all(k in params for k in keys):
    raise CheckpointError(f"{ckpt.directory}/{step}: parameters lack a {kind} "
                          f"(have {sorted(params)})")
  return Model(config=config, vocab=vocab, cnn=cnn, lm=lm,
               params={k: params[k] for k in keys},
               batch_stats=state.get("batch_stats") or {},
               image_size=image_size, input_size=config.crop_size or image_size,
               max_length=max_length, step=int(meta.get("step", step)), workdir=workdir)


def random_model(config, vocab: vocab_lib.Vocabulary, image_size: int, max_length: int,
                 seed: int = 0) -> Model:
  """A model with random weights (benchmarks and tests).

  The parameter shapes come from `jax.eval_shape` of the modules' init and the
  values from numpy (fan-in scaled normal kernels, zero biases, unit scales
  and variances), so that nothing is compiled: flax's own init of VGG16
  compiles for minutes on a busy CPU.
  """
  cnn, lm, _ = build.make_models(config, len(vocab))
  size = config.crop_size or image_size
  rng = jax.random.PRNGKey(0)
  dummy = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  cnn_shapes = jax.eval_shape(
      lambda x: cnn.init({"params": rng, "dropout": rng}, x, train=False), dummy)
  feats = jax.eval_shape(lambda v, x: cnn.apply(v, x), cnn_shapes, dummy)
  lm_shapes = jax.eval_shape(lambda f: lm.init(rng, f, jnp.zeros((1, 1, max_length + 2), jnp.int32)),
                             jax.ShapeDtypeStruct(feats.shape, jnp.float32))
  np_rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = leaf.shape
    if name in ("bias", "mean"):
      return np.zeros(shape, np.float32)
    if name in ("scale", "var"):
      return np.ones(shape, np.float32)
    fan_in = shape[-1] if name == "embedding" else int(np.prod(shape[:-1]))
    return (np_rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

  cnn_vars = jax.tree_util.tree_map_with_path(fill, cnn_shapes)
  lm_vars = jax.tree_util.tree_map_with_path(fill, lm_shapes)
  return Model(config=config, vocab=vocab, cnn=cnn, lm=lm,
               params={"cnn": cnn_vars["params"], **lm_vars["params"]},
               batch_stats=cnn_vars.get("batch_stats", {}),
               image_size=image_size, input_size=size, max_length=max_length)


# ---------------------------------------------------------------- captioning


def check_ensemble(models: Sequence[Model]) -> None:
  """Raises CheckpointError unless the models can decode together: one
  vocabulary, one image geometry."""
  first = models[0]
  for m in models[1:]:
    if m.vocab.words != first.vocab.words:
      raise CheckpointError(
          f"--checkpoint={m.workdir}: its vocabulary ({len(m.vocab)} words) differs from "
          f"that of {first.workdir} ({len(first.vocab)} words); an ensemble needs one vocabulary")
    if (m.image_size, m.input_size) != (first.image_size, first.input_size):
      raise CheckpointError(
          f"--checkpoint={m.workdir}: images of {m.image_size} px cropped to {m.input_size}, "
          f"{first.workdir} {first.image_size} px cropped to {first.input_size}; an ensemble "
          "needs one image size")


class BatchCaptioner:
  """Captions uint8 image batches with one jitted program of fixed shape.

  Call it with up to `batch_size` images [n, S, S, 3]; it pads to
  `batch_size`, so every call runs the same compiled program. Returns, per
  image, the `n_best` (caption, logprob) pairs, best first (samples too).

  `model` is a Model, or a list of Models for an ensemble (their per-step
  log-probabilities averaged; `check_ensemble`). `options` (a
  decode.DecodeOptions) says how to decode; without it, `beam_size`,
  `length_penalty` and `temperature` (> 0: sample) make them, with the
  defaults of the rest. `attention`: `run` also returns where each word
  looked (one model with attention only).
  """

  def __init__(self, model, batch_size: int = 16, beam_size: int = 2, n_best: int = 1,
               temperature: float = 0.0, length_penalty: float = 0.0, seed: int = 0,
               options=None, attention: bool = False):
    from captionjax import decode  # pylint: disable=g-import-not-at-top
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if options is None:
      options = decode.DecodeOptions(
          beam_size=1 if temperature > 0 else beam_size, length_penalty=length_penalty,
          sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0)
    if not 1 <= n_best <= options.num_captions:
      raise ValueError(f"n_best={n_best} must be between 1 and the "
                       f"{'samples' if options.sample else 'beam size'} {options.num_captions}")
    self.models = list(model) if isinstance(model, (list, tuple)) else [model]
    check_ensemble(self.models)
    self.model = self.models[0]
    self.options = options
    self.batch_size, self.beam_size, self.n_best = batch_size, options.beam_size, n_best
    self.temperature = options.temperature if options.sample else 0.0
    self._rng = jax.random.PRNGKey(seed)
    self._calls = 0
    vocab = self.model.vocab
    self._bad_endings = jnp.asarray(
        decode.bad_ending_mask(options.bad_endings, vocab.word_to_ix, len(vocab)))
    self._fn, params, batch_stats = self._program(attention)
    self._params = jax.device_put(params)
    self._batch_stats = jax.device_put(batch_stats)
    self._put = parallel.local_batch_putter(batch_size)  # split over the local devices

  def _program(self, attention: bool):
    """(jitted fn, params, batch_stats): images -> tokens, scores[, attention weights]."""
    from captionjax import steps  # pylint: disable=g-import-not-at-top
    max_length = max(m.max_length for m in self.models) + 1
    if len(self.models) > 1:
      self.attention = False
      fn = steps.make_ensemble_generate([(m.cnn, m.lm) for m in self.models], self.options,
                                        max_length)
      return (jax.jit(fn), tuple(m.params for m in self.models),
              tuple(m.batch_stats for m in self.models))
    m = self.model
    generate = steps.make_generate(m.cnn, m.lm, "frozen", self.options, max_length)
    att = attention_fn(m) if attention else None
    self.attention = att is not None  # run() also returns where each word looked

    def fn(params, batch_stats, images, rng, bad_endings):
      tokens, scores = generate(params, batch_stats, images, rng, bad_endings)
      if att is None:
        return tokens, scores
      return tokens, scores, att(params, batch_stats, images, tokens)

    return jax.jit(fn), m.params, m.batch_stats

  def _run(self, images, rng):
    return self._fn(self._params, self._batch_stats, self._put(images), rng, self._bad_endings)

  def compile(self) -> None:
    """Compiles now (else the first call does); the sampling seed stream is untouched."""
    s = self.model.input_size
    images = np.zeros((self.batch_size, s, s, 3), np.uint8)
    jax.block_until_ready(self._run(images, self._rng))

  def raw(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 [n, S, S, 3], n <= B -> (tokens [n, C, T], scores [n, C]) as numpy
    (C: the beam, or the samples in draw order)."""
    return self.run(images)[:2]

  def run(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """As `raw`, plus the attention weights [n, C, T, P] (None unless `attention`).

    weights[i, k, t] is where the LM looked (over the P grid cells) at the
    step that chose token t of caption k of image i.
    """
    n = images.shape[0]
    if n > self.batch_size:
      raise ValueError(f"{n} images in a batch of {self.batch_size}")
    if n < self.batch_size:  # pad: one shape, one compile
      pad = np.zeros((self.batch_size - n,) + images.shape[1:], np.uint8)
      images = np.concatenate([images, pad])
    rng = jax.random.fold_in(self._rng, self._calls)
    self._calls += 1
    out = jax.device_get(self._run(images, rng))  # host sync
    tokens, scores = np.asarray(out[0])[:n], np.asarray(out[1])[:n]
    return tokens, scores, (np.asarray(out[2])[:n] if self.attention else None)

  def __call__(self, images: np.ndarray) -> List[List[Tuple[str, float]]]:
    from captionjax import decode  # pylint: disable=g-import-not-at-top
    tokens, scores = self.raw(images)
    out = []
    for tok, sc in zip(tokens, scores):
      order = np.argsort(-sc, kind="stable") if self.options.sample else range(len(sc))
      best = [(self.model.vocab.decode(tok[k]), float(sc[k]))
              for k in list(order)[:self.n_best] if sc[k] > decode.NEG_INF / 2]
      out.append(best)
    return out


def attention_regions(model: Model) -> int:
  """P, the grid cells the model's LM attends over (0: no attention)."""
  return int(getattr(model.lm, "attention_regions", 0) or 0)


def attention_fn(model: Model) -> Optional[Callable]:
  """Where each word of given captions looked; None for a model without attention.

  Returns a jittable (params, batch_stats, images uint8 [B, S, S, 3],
  tokens [B, K, T]) -> weights float32 [B, K, T, P]: the LM is run on each
  caption with teacher forcing (START, then the caption's tokens), and
  weights[b, k, t] is the attention over the P grid cells (row-major, summing
  to 1) at the step that predicts tokens[b, k, t]. For captions from the
  decoder these are the weights the decoder itself used.
  """
  from captionjax.models.captioner import Captioner  # pylint: disable=g-import-not-at-top
  if not attention_regions(model):
    return None
  cnn, lm = model.cnn, model.lm

  def fn(params, batch_stats, images, tokens):
    b, k, t = tokens.shape
    feats = cnn.apply(build.cnn_variables(params["cnn"], batch_stats),
                      build.images_to_input(images), train=False)  # -> [B, D]
    v = {"params": {name: params[name] for name in build.LM_KEYS}}
    emb = lm.apply(v, feats, method=Captioner.encode)  # -> [B, P, E]
    carry = lm.apply(v, emb, method=Captioner.decode_start)
    carry = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0), carry)  # -> [B*K, ...]
    flat = tokens.reshape(b * k, t).astype(jnp.int32)
    inputs = jnp.concatenate([jnp.zeros((b * k, 1), jnp.int32), flat[:, :-1]], axis=1)  # -> [B*K, T]

    def step(carry, tok):  # tok: [B*K]
      (carry, _), state = lm.apply(v, carry, tok, method=Captioner.decode_step,
                                   mutable=["intermediates"])
      return carry, state["intermediates"]["lm"]["attention"][0]  # -> [B*K, P]

    _, weights = jax.lax.scan(step, carry, inputs.T)  # -> [T, B*K, P]
    return weights.transpose(1, 0, 2).reshape(b, k, t, -1)  # -> [B, K, T, P]

  return fn


@dataclasses.dataclass
class Item:
  """One input's outcome: its captions (best first) or the reason it failed."""
  index: int  # position in the input order
  path: str
  captions: List[Tuple[str, float]] = dataclasses.field(default_factory=list)
  error: str = ""  # one line; empty when captioned
  extra: object = None  # whatever the loader returned beside the image (a thumbnail)

  @property
  def ok(self) -> bool:
    return not self.error


def image_loader(model: Model) -> Callable:
  """path -> (model input [S, S, 3], None); raises ImageError."""
  def load(path):
    return model.preprocess(images_lib.load_image(path, size=model.image_size)), None
  return load


def prefetch_map(fn: Callable, items: Iterable, workers: int, ahead: int) -> Iterator:
  """fn over items in a thread pool, in order, at most `ahead` in flight.

  Yields (item, result, exception) with one of result and exception None, so a
  failing item never stops the stream.
  """
  def call(x):
    try:
      return fn(x), None
    except Exception as e:  # pylint: disable=broad-except
      return None, e

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    pending = collections.deque()
    it = iter(items)
    for x in it:
      pending.append((x, pool.submit(call, x)))
      if len(pending) >= ahead:
        break
    while pending:
      x, fut = pending.popleft()
      nxt = next(it, _END)
      if nxt is not _END:
        pending.append((nxt, pool.submit(call, nxt)))
      result, exc = fut.result()
      yield x, result, exc


_END = object()


def caption_files(captioner: BatchCaptioner, paths: Sequence[str],
                  load: Optional[Callable] = None, workers: int = 2) -> Iterator[Item]:
  """Captions files in order; a file that fails to load comes out with `error`.

  `load(path) -> (model input [S, S, 3], extra)` runs in `workers` threads up
  to two batches ahead of the model, so decoding overlaps with compute.
  """
  load = load or image_loader(captioner.model)
  pending: List[Item] = []  # in input order, not yet yielded
  batch: List[Item] = []
  images: List[np.ndarray] = []

  def run_batch():
    for item, caps in zip(batch, captioner(np.stack(images))):
      item.captions = caps
    batch.clear()
    images.clear()

  b = captioner.batch_size
  for index, (path, result, exc) in enumerate(prefetch_map(load, paths, workers, 2 * b)):
    if exc is not None:
      msg = str(exc) if isinstance(exc, images_lib.ImageError) else f"{type(exc).__name__}: {exc}"
      pending.append(Item(index, path, error=msg.splitlines()[0] if msg else type(exc).__name__))
    else:
      image, extra = result
      pending.append(Item(index, path, extra=extra))
      batch.append(pending[-1])
      images.append(image)
    if len(batch) == b:
      run_batch()
    if not batch:  # everything pending is resolved
      yield from pending
      pending.clear()
  if batch:
    run_batch()
  yield from pending


# ---------------------------------------------------------------- perplexity


def token_log_probs(model: Model, images: np.ndarray, captions: np.ndarray) -> np.ndarray:
  """Log-probabilities of each target token (teacher forcing).

  Args:
    images: uint8 [B, S, S, 3].
    captions: int32 [B, C, L] with START, the words, END, padding (as the input
      pipeline builds them).
  Returns:
    float32 [B, C, L-1]: log p(captions[..., t+1] | image, captions[..., :t+1]).
  """
  return np.asarray(_token_log_probs_fn(model)(model.params, model.batch_stats, images, captions))


def _token_log_probs_fn(model: Model):
  cache = model.__dict__.setdefault("_jit_cache", {})
  if "token_logp" not in cache:
    def fn(params, batch_stats, images, captions):
      feats = model.cnn.apply(build.cnn_variables(params["cnn"], batch_stats),
                              build.images_to_input(images), train=False)  # -> [B, D]
      lm_params = {"params": {k: params[k] for k in build.LM_KEYS}}
      logits = model.lm.apply(lm_params, feats, captions, train=False)  # -> [B, C, L-1, V+1]
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      return jnp.take_along_axis(logp, captions[..., 1:, None], axis=-1)[..., 0]
    cache["token_logp"] = jax.jit(fn)
  return cache["token_logp"]


def perplexity(model: Model, data, batch_size: int = 50, limit: Optional[int] = None) -> dict:
  """Perplexity of every reference caption of a split, as NeuralTalk reports it.

  exp(total negative log-likelihood / total tokens), where the tokens of a
  caption are its words and END (the tokens the training loss counts; words
  beyond max_length were cut by prepro, rare words are UNK).

  Args:
    model: the captioner.
    data: an input_pipeline.SplitData; its images must have the model's
      image_size (they are center-cropped to its input size).
    batch_size: images per batch (the last batch is padded: one compile).
    limit: caption only the first `limit` images.
  Returns:
    {"perplexity", "cross_entropy" (nats per token), "tokens", "captions", "images"}.
  """
  if data.image_size != model.image_size:
    raise ValueError(f"the data set's images are {data.image_size} px, the model's "
                     f"{model.image_size} px")
  n = len(data) if limit is None else min(limit, len(data))
  c, max_len = data.captions.shape[1], data.captions.shape[2]
  fn = _token_log_probs_fn(model)
  nll, tokens, ncap = 0.0, 0, 0
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    real = len(rows)
    rows = np.concatenate([rows, np.full(batch_size - real, rows[0])])  # pad
    imgs = data.images[rows] if data.decoded else np.stack(
        [images_lib.load_image(bytes(x), size=model.image_size) for x in data.images[rows]])
    imgs = np.stack([model.preprocess(x) for x in imgs])
    caps = np.zeros((batch_size, c, max_len + 2), np.int32)  # -> [B, C, L]
    caps[:, :, 1:-1] = data.captions[rows]
    words = (caps > 0).sum(-1)  # -> [B, C]
    pos = np.arange(max_len + 2)[None, None, :]
    mask = (pos >= 1) & (pos <= words[..., None] + 1)  # the words and END
    has = (np.arange(c)[None, :] < data.num_captions[rows][:, None])  # -> [B, C]
    has &= (np.arange(batch_size) < real)[:, None]
    mask = (mask & has[..., None])[..., 1:]  # -> [B, C, L-1], aligned with the targets
    logp = np.asarray(fn(model.params, model.batch_stats, imgs, caps), np.float64)
    nll -= float((logp * mask).sum())
    tokens += int(mask.sum())
    ncap += int(has.sum())
  ce = nll / max(tokens, 1)
  return {"perplexity": float(np.exp(ce)), "cross_entropy": ce, "tokens": tokens,
          "captions": ncap, "images": n}
