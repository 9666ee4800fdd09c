"""captionjax's public API: `load`, `Captioner`, `Caption`, `evaluate`, `train`.

These five names are what `import captionjax` exports; the `captionjax`
command's `train` and `evaluate` run through them, and `caption` through the
same batched captioner (`inference.BatchCaptioner`, `inference.caption_files`).
Everything heavy (JAX, Flax, Orbax, TensorFlow) is imported on first use, so
`import captionjax` is fast.

The examples run as doctests in the test suite, in a folder holding a
trained workdir `runs/default`, its data set's reference captions
`data/annotations_test.json` and a `photo.jpg`.

Dimensions: N images, C sentences per image, S model input size (pixels a
side), L = max_length + 2 caption positions (START, words, END).
"""

import dataclasses
import os
from typing import Any, Mapping, Optional, Tuple, Union

import numpy as np

__all__ = ["Caption", "Captioner", "load", "evaluate", "train"]

DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")  # as metrics.DEFAULT_METRICS


@dataclasses.dataclass(frozen=True)
class Caption:
  """One image's caption, from `Captioner.caption`.

  Attributes:
    text: the caption, words separated by single spaces (lowercase, no
      punctuation, as the model was trained).
    logprob: the decoder's score: log P(caption | image), words and END, when
      the length penalty is 0 (the default); sampled captions have their
      sampling log-probability.
    tokens: the words' vocabulary ids (1..V; END, id 0, not included).
    n_best: every caption kept for the image, best first; `n_best[0]` is this
      one (with an empty `n_best` of its own).

  >>> import captionjax
  >>> model = captionjax.load("runs/default")
  >>> caption, = model.caption("photo.jpg", beam_size=3, n_best=2)
  >>> caption.text == caption.n_best[0].text
  True
  >>> len(caption.tokens) == len(caption.text.split())
  True
  >>> [c.logprob <= caption.logprob for c in caption.n_best]
  [True, True]
  """
  text: str
  logprob: float
  tokens: Tuple[int, ...] = ()
  n_best: Tuple["Caption", ...] = ()

  def __str__(self) -> str:
    return self.text


class Captioner:
  """A trained captioner: captions images and scores sentences. Made by `load`.

  Images are batched (up to `batch_size` at a time, padded to a power of two
  so that few shapes are compiled) and each batch runs one jitted program:
  the CNN, the image embedding and the decoding. Decoding settings each
  compile once, on first use.

  >>> import captionjax
  >>> model = captionjax.load("runs/default")
  >>> model                                      # doctest: +ELLIPSIS
  Captioner(workdir='runs/default', step=..., image_size=...)
  >>> caption, = model.caption("photo.jpg")
  >>> logp = model.score(["photo.jpg"], [[caption.text, "a red circle"]])  # log P(s | image)
  >>> logp.shape
  (1, 2)
  """

  def __init__(self, model, batch_size: int = 16, seed: int = 0):
    """Use `load`; `model` is an `inference.Model`."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self._model = model
    self._batch_size = int(batch_size)
    self._seed = int(seed)
    self._decoders = {}  # (batch, decoding options) -> inference.BatchCaptioner

  def __repr__(self) -> str:
    return (f"Captioner(workdir={self.workdir!r}, step={self.step}, "
            f"image_size={self.image_size})")

  @property
  def workdir(self) -> str:
    """The `captionjax train` workdir the checkpoint came from."""
    return self._model.workdir

  @property
  def step(self) -> int:
    """The checkpoint's global training step."""
    return self._model.step

  @property
  def image_size(self) -> int:
    """The model's input: S x S pixels (images are resized, then center-cropped to it)."""
    return self._model.input_size

  @property
  def config(self):
    """The training run's config (an `ml_collections.ConfigDict`)."""
    return self._model.config

  # ---------------------------------------------------------------- captioning

  def caption(self, images, *, beam_size: int = 2, n_best: int = 1, sample: bool = False,
              temperature: float = 1.0, length_penalty: Optional[float] = None,
              **options) -> list:
    """Captions images: one `Caption` per image, in input order.

    Args:
      images: one image or a list of them. An image is a file path, the
        file's bytes, a PIL image, or a uint8 array [H, W, 3] (RGB; [H, W]
        is gray); a uint8 array [N, H, W, 3] is N images. Each is read as
        `captionjax caption` reads files (EXIF orientation, any color mode),
        resized to the training images' size and center-cropped to the
        model's input.
      beam_size: beams of the beam search (1: greedy).
      n_best: captions kept per image (`Caption.n_best`), at most `beam_size`
        (or `num_samples` when sampling).
      sample: sample captions from the model instead of searching; the
        samples come from this captioner's seeded stream (`load`'s `seed`):
        a fresh captioner repeats them, later calls draw new ones.
      temperature: with `sample`, the softmax temperature (lower: safer).
      length_penalty: the beam search's length normalization exponent
        (None: the training config's).
      **options: the other decoding options, as `captionjax caption`'s flags
        of the same names (`captionjax.decode.DecodeOptions`): `min_length`
        (1: no empty caption), `block_trigrams`, `bad_endings` (words a
        caption may not end on; default: the training config's),
        `num_groups` and `diversity_lambda` (diverse beam search), `top_k`,
        `top_p` and `num_samples` (with `sample`).

    Returns:
      list of `Caption`, one per image.

    Raises:
      ValueError: bad settings, or (`captionjax.images.ImageError`) the first
        image that cannot be read, named.
      TypeError: an input that is no image.

    >>> import captionjax
    >>> model = captionjax.load("runs/default")
    >>> caption, = model.caption("photo.jpg")
    >>> print(caption.text)                          # doctest: +SKIP
    a big white square with a purple diamond and a blue cross
    >>> from PIL import Image
    >>> import numpy as np
    >>> image = np.asarray(Image.open("photo.jpg"))  # uint8 [H, W, 3]
    >>> same = model.caption([image, Image.open("photo.jpg")])
    >>> [c.text == caption.text for c in same]
    [True, True]
    >>> sampled, = model.caption("photo.jpg", sample=True, num_samples=3, n_best=3)
    >>> len(sampled.n_best)
    3
    """
    from captionjax import inference  # pylint: disable=g-import-not-at-top
    inputs = _image_list(images)
    options = self._options(beam_size, sample, temperature, length_penalty, options)
    if not inputs:
      return []
    decoder = self._decoder(len(inputs), n_best, options)
    out = []
    for item in inference.caption_files(decoder, inputs, load=lambda x: (self._prepare(x), None)):
      if not item.ok:
        from captionjax import images as images_lib  # pylint: disable=g-import-not-at-top
        raise images_lib.ImageError(f"{_describe(item.path, item.index)}: {item.error}")
      out.append(self._caption(item.captions))
    return out

  def _options(self, beam_size, sample, temperature, length_penalty, options):
    """A decode.DecodeOptions, with `captionjax caption`'s defaults: the length
    penalty and bad endings of the training config, the rest DecodeOptions'."""
    from captionjax import decode  # pylint: disable=g-import-not-at-top
    known = {f.name for f in dataclasses.fields(decode.DecodeOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
      raise TypeError(f"caption() got an unknown decoding option {unknown[0]!r} "
                      f"(known: {', '.join(sorted(known))})")
    config = self._model.config
    if length_penalty is None:
      length_penalty = float(config.get("length_penalty", 0.0))
    options = {"bad_endings": config.get("bad_endings", ",".join(decode.BAD_ENDINGS)),
               **options}
    return decode.DecodeOptions(
        beam_size=1 if sample else beam_size, length_penalty=float(length_penalty),
        sample=bool(sample), temperature=float(temperature) if sample else 1.0, **options)

  def _decoder(self, n: int, n_best: int, options):
    """The BatchCaptioner for n images, n_best and these DecodeOptions (made once)."""
    from captionjax import inference  # pylint: disable=g-import-not-at-top
    key = (self._batch(n), n_best, options)
    if key not in self._decoders:
      self._decoders[key] = inference.BatchCaptioner(
          self._model, batch_size=key[0], n_best=n_best, seed=self._seed, options=options)
    return self._decoders[key]

  def _batch(self, n: int) -> int:
    """Images per jitted call for n images: a power of two up to batch_size."""
    return min(self._batch_size, 1 << max(n - 1, 0).bit_length())

  def _caption(self, captions) -> Caption:
    """[(text, logprob)] best first -> a Caption."""
    if not captions:  # every beam was cut off (never with a trained model)
      return Caption("", float("nan"))
    vocab = self._model.vocab
    alts = tuple(Caption(text, float(logprob), tuple(vocab.encode(text.split(), len(text))))
                 for text, logprob in captions)
    return dataclasses.replace(alts[0], n_best=alts)

  def _prepare(self, image) -> np.ndarray:
    """One image (see `caption`) -> uint8 [S, S, 3], as `captionjax caption` reads files."""
    from captionjax import images as images_lib  # pylint: disable=g-import-not-at-top
    model = self._model
    size = model.image_size
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
      source = bytes(image) if isinstance(image, bytearray) else image
      array = images_lib.load_image(source if isinstance(source, bytes) else os.fspath(source),
                                    size=size)
    elif isinstance(image, np.ndarray):
      if image.dtype != np.uint8:
        raise images_lib.ImageError(f"an array of {image.dtype}: expected uint8 values 0..255")
      if image.ndim == 3 and image.shape == (size, size, 3):
        array = image  # already the training images' size: the exact pixels
      elif image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4)):
        from PIL import Image  # pylint: disable=g-import-not-at-top
        if image.ndim == 3 and image.shape[-1] == 1:
          image = image[..., 0]
        array = images_lib.from_pil(Image.fromarray(np.ascontiguousarray(image)), size)
      else:
        raise images_lib.ImageError(f"an array of shape {image.shape}: expected [H, W, 3]")
    else:  # a PIL image (checked by _image_list)
      array = images_lib.from_pil(image, size)
    return model.preprocess(array)

  # ---------------------------------------------------------------- scoring

  def score(self, images, sentences, *, length_normalized: bool = False) -> np.ndarray:
    """log P(sentence | image), by teacher forcing: the words and END.

    Sentences are tokenized as prepro does (lowercase, punctuation dropped);
    words outside the model's vocabulary count as its UNK word, and words
    past the training data's `max_length` are cut, as in training.

    Args:
      images: N images, as `caption` takes them.
      sentences: a string (scored against every image), N strings (one per
        image), or N lists of C strings each (C per image, e.g. candidates to
        rank).
      length_normalized: divide each sum by its number of tokens (the words
        kept, plus END).

    Returns:
      float64 [N] (one sentence per image) or [N, C].

    >>> import captionjax
    >>> model = captionjax.load("runs/default")
    >>> candidates = ["a red circle", "two blue squares", "a green triangle"]
    >>> logp = model.score(["photo.jpg"], [candidates])
    >>> logp.shape
    (1, 3)
    >>> best = candidates[int(logp[0].argmax())]
    >>> per_token = model.score("photo.jpg", candidates[0], length_normalized=True)
    >>> bool(abs(per_token[0] - logp[0, 0] / 4) < 1e-9)  # 3 words + END
    True
    """
    from captionjax import inference  # pylint: disable=g-import-not-at-top
    model = self._model
    inputs = _image_list(images)
    n = len(inputs)
    if n == 0:
      raise ValueError("no images to score")
    rows, per_image = _sentence_rows(sentences, n)
    c = len(rows[0])
    ids = [[self._encode(s) for s in row] for row in rows]
    length = np.array([[len(x) for x in row] for row in ids], np.int64)  # -> [N, C]
    caps = np.zeros((n, c, model.max_length + 2), np.int32)  # -> [N, C, L]
    for i, row in enumerate(ids):
      for j, x in enumerate(row):
        caps[i, j, 1:1 + len(x)] = x
    b = self._batch(n)
    total = np.zeros((n, c), np.float64)
    targets = np.arange(model.max_length + 1)  # target t predicts position t + 1
    for start in range(0, n, b):
      chunk = list(range(start, min(start + b, n)))
      imgs = np.stack([self._prepare(inputs[i]) for i in chunk])
      cap = caps[chunk]
      if len(chunk) < b:  # pad: one shape per batch size, one compile
        imgs = np.concatenate([imgs, np.zeros((b - len(chunk),) + imgs.shape[1:], np.uint8)])
        cap = np.concatenate([cap, np.zeros((b - len(chunk),) + cap.shape[1:], np.int32)])
      logp = inference.token_log_probs(model, imgs, cap)[:len(chunk)]  # -> [b, C, L-1]
      mask = targets[None, None, :] <= length[chunk][..., None]  # the words and END
      total[chunk] = (logp.astype(np.float64) * mask).sum(-1)
    if length_normalized:
      total /= length + 1
    return total[:, 0] if not per_image else total

  def _encode(self, sentence: str) -> list:
    from captionjax import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
    if not isinstance(sentence, str):
      raise TypeError(f"a sentence must be a string, got {type(sentence).__name__}")
    return self._model.vocab.encode(vocab_lib.tokenize(sentence), self._model.max_length)


def _describe(image, index: int) -> str:
  """How an error names an input: its path, else its position and kind."""
  if isinstance(image, (str, os.PathLike)):
    return os.fspath(image)
  kind = (f"array {image.shape}" if isinstance(image, np.ndarray)
          else type(image).__name__)
  return f"images[{index}] ({kind})"


def _is_single(x) -> bool:
  if isinstance(x, (str, os.PathLike, bytes, bytearray)):
    return True
  if isinstance(x, np.ndarray):
    return x.ndim != 4
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return isinstance(x, Image.Image)


def _image_list(images) -> list:
  """One image, a list of them, or a uint8 array [N, H, W, 3] -> a list of single images."""
  if isinstance(images, np.ndarray) and images.ndim == 4:
    return list(images)
  if _is_single(images):
    return [images]
  if not isinstance(images, (list, tuple)):
    raise TypeError(f"images: expected a path, bytes, a PIL image, a uint8 array or a list "
                    f"of them, got {type(images).__name__}")
  out = []
  for i, x in enumerate(images):
    if not _is_single(x):
      raise TypeError(f"images[{i}]: expected a path, bytes, a PIL image or a uint8 array "
                      f"[H, W, 3], got {type(x).__name__}"
                      + (f" of shape {x.shape}" if isinstance(x, np.ndarray) else ""))
    out.append(x)
  return out


def _sentence_rows(sentences, n: int):
  """(rows: N lists of C strings, per_image: whether the caller gave lists)."""
  if isinstance(sentences, str):
    return [[sentences]] * n, False
  sentences = list(sentences)
  if len(sentences) != n:
    raise ValueError(f"sentences: {len(sentences)} for {n} image(s); give one string per "
                     "image, or one list of sentences per image ([[...]] for one image)")
  if all(isinstance(s, str) for s in sentences):
    return [[s] for s in sentences], False
  rows = [[s] if isinstance(s, str) else list(s) for s in sentences]
  sizes = {len(r) for r in rows}
  if len(sizes) != 1 or 0 in sizes:
    raise ValueError(f"sentences: every image needs the same number of sentences "
                     f"(got {sorted(sizes)})")
  return rows, True


def load(workdir: Union[str, os.PathLike], step: Optional[int] = None, *,
         batch_size: int = 16, seed: int = 0) -> Captioner:
  """Loads a `captionjax train` workdir's checkpoint as a `Captioner`.

  Args:
    workdir: the training run's folder (`config.json`, `vocab.json`,
      `checkpoints/`).
    step: a checkpoint step (None: the latest).
    batch_size: most images per jitted call.
    seed: the seed of sampled captions.

  Returns:
    a `Captioner`; the parameters are loaded, nothing is compiled yet.

  Raises:
    ValueError: not a workdir, no checkpoint, or a checkpoint without a
      language model yet (the CNN pretraining phase); the message names it.

  >>> import captionjax
  >>> model = captionjax.load("runs/default")
  >>> model.step > 0
  True
  >>> try:
  ...   captionjax.load("runs/none")
  ... except ValueError as e:
  ...   print(e)
  runs/none: no such directory (give a `captionjax train` workdir)
  """
  from captionjax import inference  # pylint: disable=g-import-not-at-top
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
    raise ValueError(f"{workdir}: no such directory (give a `captionjax train` workdir)")
  return Captioner(inference.load_workdir(workdir, step), batch_size, seed)


def evaluate(references, results, *, metrics=DEFAULT_METRICS) -> dict:
  """Scores captions against references as coco-caption does (`captionjax evaluate`).

  Args:
    references: {image_id: [reference caption, ...]}, or the path of a COCO
      caption-annotations file (prepro writes `annotations_SPLIT.json`).
    results: {image_id: caption} (a string or a `Caption`), a list of
      {"image_id", "caption"} records, or the path of such a JSON list (what
      `captionjax caption --output` and training's `captions.json` hold).
      Only these images are scored; each must have references.
    metrics: any of "bleu", "meteor", "rouge", "cider", "spice" (a list, or
      one comma-separated string). METEOR needs Java and SPICE its models:
      without them they are left out, with a note on stderr.

  Returns:
    {name: score} with coco-caption's names (`Bleu_1`..`Bleu_4`, `METEOR`,
    `ROUGE_L`, `CIDEr`, `SPICE`): the numbers `captionjax evaluate` prints.

  Raises:
    ValueError: malformed input or an unknown metric, named.

  >>> import captionjax
  >>> scores = captionjax.evaluate({1: ["a red circle", "a small red circle"]},
  ...                              {1: "a red circle"}, metrics=["bleu"])
  >>> round(scores["Bleu_1"], 6)
  1.0
  >>> scores = captionjax.evaluate("data/annotations_test.json",
  ...                              "runs/default/captions.json",
  ...                              metrics="bleu,rouge,cider")
  >>> sorted(scores)
  ['Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'CIDEr', 'ROUGE_L']
  """
  from captionjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from captionjax.metrics import cli as metrics_cli  # pylint: disable=g-import-not-at-top
  names = ([m for m in metrics.split(",") if m.strip()] if isinstance(metrics, str)
           else list(metrics))
  metrics_lib._check_metrics(names)  # pylint: disable=protected-access
  if isinstance(references, (str, os.PathLike)):
    references = metrics_cli.load_annotations(os.fspath(references))
  elif not isinstance(references, Mapping):
    raise TypeError(f"references: expected a dict or a file path, "
                    f"got {type(references).__name__}")
  if isinstance(results, (str, os.PathLike)):
    results = metrics_cli.load_results(os.fspath(results))
  elif isinstance(results, (list, tuple)):
    results = metrics_cli.results_from_records(list(results))
  elif not isinstance(results, Mapping):
    raise TypeError(f"results: expected a dict, a list of records or a file path, "
                    f"got {type(results).__name__}")
  results = {k: v.text if isinstance(v, Caption) else v for k, v in results.items()}
  missing = [k for k in results if k not in references]
  if missing:
    raise ValueError(f"results: {len(missing)} image_id(s) without references, "
                     f"e.g. {missing[0]!r}")
  return metrics_lib.score(references, results, metrics=names)


def train(config, workdir: Union[str, os.PathLike], *,
          overrides: Optional[Mapping[str, Any]] = None, progress: bool = True,
          start_from: Optional[str] = None) -> dict:
  """Trains a captioner into `workdir` (resuming what is there), as `captionjax train`.

  At the end the test split is captioned with beam search into
  `WORKDIR/captions.json` and scored into `WORKDIR/scores.json`. Running it
  again resumes exactly from the latest checkpoint; on a finished run it
  trains no further and captions and scores the test split again.

  Args:
    config: a config name (`"default"`, `"neuraltalk2"`), a config file's
      path, an `ml_collections.ConfigDict`, or None: the config the workdir
      was trained with (to resume it).
    workdir: checkpoints, logs and results.
    overrides: {field: value} applied to the config, dotted names for
      nested fields (`{"batch_size": 64, "model.rnn_size": 128}`), checked
      as `--config.FIELD=VALUE` is.
    progress: show progress bars (on stderr).
    start_from: another run's workdir whose latest checkpoint initializes the
      model (NeuralTalk2's -start_from).

  Returns:
    what `scores.json` holds: the test split's scores (coco-caption names,
    `hallucination_free` on shapes, `human_ceiling`) and
    {"splits": {split: scores}, "beam_size", "train_seconds"}.

  Raises:
    ValueError: a bad config, data set or checkpoint (named).
    OSError: the workdir cannot be written.
    captionjax.checkpoints.Preempted: SIGTERM or SIGINT stopped the run
      (after saving a checkpoint).

  Training the default recipe on the generated shapes set takes about six
  minutes on two CPU cores:

  >>> import captionjax
  >>> scores = captionjax.train("default", "runs/default")  # doctest: +SKIP

  On a finished run, training again only captions and scores the test split
  again, with the same numbers as `evaluate`:

  >>> scores = captionjax.train(None, "runs/default", progress=False)
  >>> again = captionjax.evaluate("data/annotations_test.json",
  ...                             "runs/default/captions.json", metrics=["cider"])
  >>> scores["CIDEr"] == again["CIDEr"]
  True
  """
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from captionjax import configs  # pylint: disable=g-import-not-at-top
  from captionjax import trainer  # pylint: disable=g-import-not-at-top
  workdir = os.fspath(workdir)
  if config is None:
    path = os.path.join(workdir, "config.json")
    try:
      with open(path, encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    except FileNotFoundError:
      raise ValueError(f"{path}: no config to resume (config=None needs a trained "
                       "workdir)") from None
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: cannot read the run's config ({e})") from None
  elif isinstance(config, (str, os.PathLike)):
    config = configs.load_config(os.fspath(config))
  elif isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config.to_dict())  # a copy: the caller's is untouched
  else:
    raise TypeError(f"config: expected a name, a file path, a ConfigDict or None, "
                    f"got {type(config).__name__}")
  for field, value in (overrides or {}).items():
    text = value if isinstance(value, str) else repr(value)
    configs.apply_override(config, f"{field}={text}")
  return trainer.train_and_evaluate(config, workdir, progress=progress, start_from=start_from)
