"""Image-sentence retrieval: every sentence scored against every image, R@K.

  alignment_scorer   the alignment model's scores of M sentences x N images:
                     one jitted program, sentences in chunks (lax.map)
  generative_scorer  the captioner as a ranker: length-normalized
                     log P(sentence | image), the same way
  Ranker             either of them on a loaded workdir (features, scores,
                     word groundings), optionally minus the sentence's
                     log-probability under a blank image (the captioner)
  retrieval_metrics  R@1, R@5, R@10 and the median rank, both directions
  rank_split         a split's first N images and their sentences, ranked
  final_test         the end of a ranking training run: ranking.json
  RankValidator      the validation loss and R@K during training

Directions, as Karpathy and Fei-Fei's table: "sentence retrieval" (image
annotation) ranks the M sentences for each image, by its best-ranked
ground-truth sentence; "image retrieval" (image search) ranks the N images for
each sentence. R@K in percent; ranks start at 1, and a tie counts against the
ground truth.

Dimensions: N images, M sentences, T words (max_length), L = T + 2 (START,
END), D CNN feature size, P regions, H joint space, V vocabulary size.
"""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from captionjax import evaluation
from captionjax import input_pipeline
from captionjax import parallel
from captionjax.models import build
from captionjax.models import ranking as ranking_lib

KS = (1, 5, 10)
CHUNK_BYTES = 256 << 20  # the largest intermediate of one chunk of sentences
FILE = "ranking.json"
CALLS = 20  # score() runs its chunks in this many calls at most (progress between them)
PROGRESS_PAIRS = 1_000_000  # a progress bar from this many pairs


def _progress(show: bool, total: int):
  """A tqdm bar over `total` pairs on stderr (a no-op one when not `show`)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, unit="pair", unit_scale=True, disable=not show, file=sys.stderr,
              dynamic_ncols=True, desc="scoring")


# ---------------------------------------------------------------- scoring all pairs


def _chunk(m: int, per_sentence_bytes: int, budget: int = CHUNK_BYTES) -> int:
  """Sentences per chunk: as many as fit the budget (at least 1, at most M)."""
  return int(max(1, min(m, budget // max(per_sentence_bytes, 1))))


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
  """x with zero rows appended up to a multiple of `multiple` rows."""
  extra = -len(x) % multiple
  return np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)]) if extra else x


def alignment_scorer(model, chunk: int):
  """(params, feats [N, D], tokens [M, T]) -> scores [M, N] (M a multiple of `chunk`).

  One program: the images' regions once, then lax.map over chunks of `chunk`
  sentences, each scored against every image ([chunk, N, T, P] at a time).
  """
  def fn(params, feats, tokens):
    v = {"params": params}
    regions = model.apply(v, feats, method=ranking_lib.AlignmentModel.embed_images)  # [N, P, H]

    def one(tok):  # [c, T]
      words = model.apply(v, tok, method=ranking_lib.AlignmentModel.embed_sentences)
      return ranking_lib.alignment_scores(regions, words, tok, model.rectify)  # -> [c, N]

    out = jax.lax.map(one, tokens.reshape(-1, chunk, tokens.shape[-1]))  # -> [M/c, c, N]
    return out.reshape(-1, regions.shape[0])  # -> [M, N]
  return fn


def caption_buffer(tokens: np.ndarray) -> np.ndarray:
  """Words [M, T] -> the LM's input [M, L]: START (0), the words, END (0)."""
  out = np.zeros((tokens.shape[0], tokens.shape[1] + 2), np.int32)
  out[:, 1:-1] = tokens
  return out


def generative_scorer(lm, chunk: int):
  """(lm params, feats [N, D], captions [M, L], counted [M]) -> [M, N]: the mean
  log P per token of each sentence under each image.

  The tokens of a sentence are its words and END (as the training loss counts
  them): counted = words + 1. M is a multiple of `chunk`; a chunk's rows
  should be of similar lengths (the caller sorts them), since its recurrence
  runs as many steps as its longest sentence. The image side (embedding,
  first step, attention keys) runs once per image, the word embeddings once
  per sentence; the recurrence, the attention and the output layer run on
  chunk x N pairs at a time (LanguageModel.pair_step).
  """
  def fn(lm_params, feats, captions, counted):
    v = {"params": lm_params}
    n = feats.shape[0]
    start = lm.apply(v, lm.apply(v, feats, method="encode"), method="decode_start")

    def one(args):
      caps, count = args  # [c, L], [c]
      c = caps.shape[0]
      words = lm.apply(v, caps, method=lambda m, x: m.lm.embed(x))  # -> [c, L, E]
      carry = lm.apply(v, start, c, method=lambda m, *a: m.lm.pair_carry(*a))

      def body(t, state):
        carry, total = state
        x_t = jax.lax.dynamic_index_in_dim(words, t, axis=1)  # -> [c, 1, E]
        y_t = jax.lax.dynamic_index_in_dim(caps, t + 1, axis=1, keepdims=False)  # -> [c]
        carry, logp = lm.apply(v, carry, x_t, y_t, method=lambda m, *a: m.lm.pair_step(*a))
        return carry, total + jnp.where((t < count)[:, None], logp, 0.0)  # -> [c, N]

      _, total = jax.lax.fori_loop(0, count.max(), body, (carry, jnp.zeros((c, n))))
      return total / count[:, None]  # -> [c, N]

    out = jax.lax.map(one, (captions.reshape(-1, chunk, captions.shape[-1]),
                            counted.reshape(-1, chunk)))
    return out.reshape(-1, n)  # -> [M, N]
  return fn


# ---------------------------------------------------------------- the metrics


def ranks(scores: np.ndarray, image_of: np.ndarray):
  """(sentence ranks [N], image ranks [M]), 1-based; ties count against the truth.

  sentence rank of image n: the position of its best-scored ground-truth
  sentence among all M; image rank of sentence m: its image's among all N.
  """
  scores = np.asarray(scores, np.float64)
  m, n = scores.shape
  image_of = np.asarray(image_of)
  truth = scores[np.arange(m), image_of]  # -> [M]
  image_rank = 1 + (scores >= truth[:, None]).sum(1) - 1  # the others at or above it
  best = np.full(n, -np.inf)
  np.maximum.at(best, image_of, truth)  # each image's best ground-truth sentence
  own = image_of[:, None] == np.arange(n)[None, :]  # -> [M, N]
  sentence_rank = 1 + ((scores >= best[None, :]) & ~own).sum(0)
  return sentence_rank, image_rank


def recall_table(r: np.ndarray) -> dict:
  """{"R@1", "R@5", "R@10" (percent), "median_rank"} of 1-based ranks."""
  out = {f"R@{k}": round(float(100.0 * np.mean(r <= k)), 2) for k in KS}
  out["median_rank"] = float(np.median(r))
  return out


def retrieval_metrics(scores: np.ndarray, image_of: np.ndarray) -> dict:
  """{"sentence_retrieval": table, "image_retrieval": table} (see recall_table)."""
  sentence_rank, image_rank = ranks(scores, image_of)
  return {"sentence_retrieval": recall_table(sentence_rank),
          "image_retrieval": recall_table(image_rank)}


def flat(metrics: dict, prefix: str = "") -> dict:
  """{"sentence_R@1": .., "image_median_rank": .., "rsum": ..} for logs."""
  out = {}
  for d, name in (("sentence_retrieval", "sentence"), ("image_retrieval", "image")):
    for k, v in metrics[d].items():
      out[f"{prefix}{name}_{k}"] = v
  out[f"{prefix}rsum"] = round(sum(metrics[d][f"R@{k}"] for d in
                                   ("sentence_retrieval", "image_retrieval") for k in KS), 2)
  return out


# ---------------------------------------------------------------- sentences and features


def split_sentences(data, num_images: int | None = None):
  """(tokens [M, T], image_of [M]) of the first `num_images` images' captions."""
  n = len(data) if not num_images or num_images < 0 else min(num_images, len(data))
  rows = [(i, j) for i in range(n) for j in range(int(data.num_captions[i]))]
  tokens = np.stack([data.captions[i, j] for i, j in rows]).astype(np.int32)
  return tokens, np.array([i for i, _ in rows], np.int64)


def cnn_features(cnn, params, batch_stats, images: np.ndarray, batch_size: int = 100):
  """The CNN's features of uint8 images [N, S, S, 3] -> [N, ...] (padded batches, one compile)."""
  fn = _cnn_fn(cnn)
  b = min(batch_size, len(images))
  out = []
  for start in range(0, len(images), b):
    x = images[start:start + b]
    real = len(x)
    out.append(np.asarray(fn(params, batch_stats, _pad_rows(x, b)))[:real])
  return np.concatenate(out)


def _cnn_fn(cnn):
  cache = _cnn_fn.__dict__.setdefault("cache", {})
  if id(cnn) not in cache:
    cache[id(cnn)] = (cnn, jax.jit(lambda p, bs, x: cnn.apply(
        build.cnn_variables(p, bs), build.images_to_input(x), train=False)))
  return cache[id(cnn)][1]


def split_images(data, n: int, input_size: int) -> np.ndarray:
  """The first n images of a split, decoded and center-cropped to the model's input."""
  from captionjax import images as images_lib  # pylint: disable=g-import-not-at-top
  from captionjax import inference  # pylint: disable=g-import-not-at-top
  imgs = data.images[:n] if data.decoded else np.stack(
      [images_lib.load_image(bytes(x), size=data.image_size) for x in data.images[:n]])
  return np.stack([inference.center_crop(x, input_size) for x in imgs])


# ---------------------------------------------------------------- a loaded model as a ranker


class Ranker:
  """Scores sentences against images with a loaded workdir (inference.Model).

  The alignment model scores with its alignments; a captioner with the mean
  log-probability per token, minus that under a blank image when
  prior="blank". `score(feats, tokens)` -> [M, N]; `timing` holds the last
  call's compile and run seconds.
  """

  def __init__(self, model, prior: str = "none", chunk_bytes: int = CHUNK_BYTES,
               progress: bool = False):
    if prior not in ("none", "blank"):
      raise ValueError(f"prior must be 'none' or 'blank', got {prior!r}")
    self.model, self.prior, self.chunk_bytes = model, prior, chunk_bytes
    self.progress = progress  # a progress bar (stderr) over the pairs of a large score()
    self.kind = build.model_kind(model.config)
    if self.kind == "ranking" and prior != "none":
      raise ValueError("--prior=blank is for a captioner (the alignment model has no prior)")
    self.keys = build.head_keys(model.config)
    self.head = jax.device_put({k: model.params[k] for k in self.keys})
    self.timing = {}
    self._compiled = {}
    self._compile_s = 0.0

  @property
  def description(self) -> str:
    if self.kind == "ranking":
      return "alignment model: sum over words of the best region's rectified dot product"
    return "captioner: mean log P(sentence | image) per token" + (
        " minus that under a blank image" if self.prior == "blank" else "")

  def features(self, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
    """uint8 [N, S, S, 3] -> CNN features [N, ...]."""
    m = self.model
    return cnn_features(m.cnn, m.params["cnn"], m.batch_stats, images, batch_size)

  def _per_sentence_bytes(self, n: int, t: int, feats) -> int:
    if self.kind == "ranking":
      regions = ranking_lib.as_regions(jnp.zeros((1,) + feats.shape[1:]), self.model.lm.regions)
      return n * t * regions.shape[1] * 4 * 2  # the dots and their max
    lm, v = self.model.lm, len(self.model.vocab) + 1
    # One step's per-pair values: cells' carry and gates, attention, logits.
    att = (lm.attention_regions + 3) * lm.input_encoding_size if lm.attention_regions else 0
    return n * 4 * (lm.num_layers * 8 * lm.rnn_size + att + 2 * v)

  def score(self, feats: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[M, N] scores of sentences (words [M, T]) against images (features [N, ...])."""
    t0 = time.time()
    if self.kind == "ranking":
      out = self._run(feats, tokens.astype(np.int32), alignment_scorer)
    else:
      x = caption_buffer(tokens)
      out = self._log_probs(feats, x)
    compile_s, t1 = self._compile_s, time.time()
    if self.prior == "blank":
      out = out - self.blank_scores(x)[:, None]
    self.timing = {"compile_s": round(compile_s, 2), "score_s": round(t1 - t0 - compile_s, 2)}
    return out

  def _log_probs(self, feats: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A captioner's [M, N] mean log P per token of LM inputs x [M, L]."""
    order = np.argsort((x > 0).sum(-1), kind="stable")  # chunks of similar lengths
    out = self._run(feats, x[order], generative_scorer, counted=True)
    return out[np.argsort(order)]

  def _run(self, feats, x: np.ndarray, scorer, counted: bool = False) -> np.ndarray:
    """scorer(lm, chunk) over rows x [M, ...] -> [M, N], in up to CALLS calls
    of one compiled program (a progress bar between them when self.progress);
    its compile time in self._compile_s."""
    n, m = feats.shape[0], x.shape[0]
    t = x.shape[1] - (0 if self.kind == "ranking" else 2)
    c = _chunk(m, self._per_sentence_bytes(n, t, feats), self.chunk_bytes)
    rows = c * -(-m // (c * CALLS))  # per call: whole chunks
    x = _pad_rows(x, rows)
    counts = (x > 0).sum(-1).astype(np.int32) + 1  # the tokens scored: the words and END
    feats = jnp.asarray(feats)
    key = (scorer.__name__, feats.shape, rows, x.shape[1], c)
    t0 = time.time()
    if key not in self._compiled:
      args = [self.head, feats, x[:rows]] + ([counts[:rows]] if counted else [])
      self._compiled[key] = jax.jit(scorer(self.model.lm, c)).lower(*args).compile()
    self._compile_s = time.time() - t0
    out = []
    with _progress(self.progress and m * n >= PROGRESS_PAIRS, m * n) as bar:
      for i in range(0, len(x), rows):
        args = [self.head, feats, x[i:i + rows]] + ([counts[i:i + rows]] if counted else [])
        out.append(np.asarray(self._compiled[key](*args)))  # host sync
        bar.update(min(rows, m - i) * n)
    return np.concatenate(out)[:m]

  def blank_scores(self, x: np.ndarray) -> np.ndarray:
    """[M]: each sentence's (LM input [M, L]) score under a blank (black) image."""
    s = self.model.input_size
    blank = self.features(np.zeros((1, s, s, 3), np.uint8))
    return self._log_probs(blank, x)[:, 0]

  def groundings(self, feats: np.ndarray, tokens: np.ndarray):
    """Pairs (image k: feats [K, ...], sentence k: words [K, T]) -> (each word's
    grounding score [K, T], its best region [K, T]); None for a captioner."""
    if self.kind != "ranking":
      return None
    lm = self.model.lm

    def fn(params, f, tok):
      v = {"params": params}
      regions = lm.apply(v, f, method=ranking_lib.AlignmentModel.embed_images)
      words = lm.apply(v, tok, method=ranking_lib.AlignmentModel.embed_sentences)
      return ranking_lib.word_alignments(regions, words, lm.rectify)

    if "groundings" not in self._compiled:
      self._compiled["groundings"] = jax.jit(fn)
    score, region = self._compiled["groundings"](self.head, jnp.asarray(feats),
                                                 jnp.asarray(tokens, jnp.int32))
    mask = np.asarray(tokens) > 0
    return np.asarray(score) * mask, np.where(mask, np.asarray(region), -1)


def rank_split(ranker: Ranker, data, num_images: int | None = None, batch_size: int = 100):
  """Ranks the first `num_images` images of a split and their sentences.

  Returns (result, scores [M, N], tokens [M, T], image_of [M], feats [N, ...]);
  result is what ranking.json holds.
  """
  tokens, image_of = split_sentences(data, num_images)
  n = int(image_of.max()) + 1
  feats = ranker.features(split_images(data, n, ranker.model.input_size), batch_size)
  scores = ranker.score(feats, tokens)
  result = {"num_images": n, "num_sentences": int(len(tokens)),
            **retrieval_metrics(scores, image_of),
            "model": ranker.kind, "score": ranker.description,
            "seconds": {"compile": ranker.timing["compile_s"],
                        "score_all_pairs": ranker.timing["score_s"]}}
  return result, scores, tokens, image_of, feats


def print_table(result: dict, say=print) -> None:
  """The paper's table: R@1, R@5, R@10, median rank in both directions."""
  say(f"{result['num_images']} images, {result['num_sentences']} sentences; {result['score']}")
  say(f"{'':<38}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'med r':>7}")
  for d, name in (("sentence_retrieval", "sentence retrieval (image annotation)"),
                  ("image_retrieval", "image retrieval (image search)")):
    t = result[d]
    say(f"{name:<38}{t['R@1']:>7.1f}{t['R@5']:>7.1f}{t['R@10']:>7.1f}{t['median_rank']:>7g}")
  s = result.get("seconds")
  if s:
    say(f"scoring all {result['num_sentences']} x {result['num_images']} pairs: "
        f"{s['score_all_pairs']:.2f}s (compiled in {s['compile']:.2f}s)")


def write_result(path: str, result: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


# ---------------------------------------------------------------- training: validation, final test


class RankValidator:
  """The validation split's ranking loss and R@K for a train state (training).

  `features`: the split's cached CNN features (None: images through the CNN).
  """

  def __init__(self, cnn, model, mode, data, config, mesh_put, features=None):
    from captionjax import steps  # pylint: disable=g-import-not-at-top
    self.cnn, self.model, self.data, self.config = cnn, model, data, config
    self.mesh_put, self.features = mesh_put, features
    self.eval_step = jax.jit(steps.make_eval_step(cnn, model, mode, config))
    self.tokens, self.image_of = (split_sentences(data, config.eval_num_images)
                                  if data is not None else (None, None))
    n = int(self.image_of.max()) + 1 if data is not None else 0
    self.images = (split_images(data, n, config.crop_size or data.image_size)
                   if data is not None and features is None else None)
    self._score = None

  def loss(self, state) -> float:
    batches = input_pipeline.eval_batches(self.data, self.config.eval_batch_size,
                                          self.config.seq_per_img)
    return evaluation.mean_loss(self.eval_step, state, batches, ("captions", "_mask"),
                                self.features, self.mesh_put)

  def run(self, state):
    """(record, metrics) of `state` on the split; (None, None) without a split."""
    if self.data is None:
      return None, None
    n = int(self.image_of.max()) + 1
    params, bs = state["params"], state["batch_stats"]
    if self.features is not None:
      feats = self.features[:n]
    else:
      feats = cnn_features(self.cnn, params["cnn"], bs, self.images, self.config.eval_batch_size)
    c = _chunk(len(self.tokens), n * self.tokens.shape[1] * self.model.regions * 4 * 2)
    if self._score is None:
      self._score = jax.jit(alignment_scorer(self.model, c))
    head = {k: params[k] for k in ranking_lib.SCORE_KEYS}
    scores = np.asarray(self._score(head, jnp.asarray(feats), _pad_rows(self.tokens, c)))
    metrics = retrieval_metrics(scores[:len(self.tokens)], self.image_of)
    rec = {"phase": "val", "val_loss": self.loss(state), **flat(metrics, "val_")}
    return rec, metrics

  def __call__(self, state, step: int, logger):
    """Runs on `state`; logs the record at `step`; returns it."""
    import sys  # pylint: disable=g-import-not-at-top
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    rec, _ = self.run(state)
    if rec:
      logger.log(step, rec, echo=lambda s: tqdm.write(s, file=sys.stderr))
    return rec

  @staticmethod
  def selection(rec: dict):
    """(score, name) by which the best checkpoint is kept: R@1 + R@5 + R@10, both ways."""
    return rec["val_rsum"], "val_rsum"


def final_test(cnn, model, params, batch_stats, config, data_dir, info, vocab, mesh_put,
               workdir, t_start, say=print) -> dict:
  """Ranks the test split's first `config.rank_num_images` images and their
  sentences; writes WORKDIR/ranking.json; returns it with flat R@K keys for the log."""
  from captionjax import inference  # pylint: disable=g-import-not-at-top
  del mesh_put, info
  split = config.test_split
  data = input_pipeline.load_config_split(config, data_dir, split)
  size = config.crop_size or data.image_size
  loaded = inference.Model(config=config, vocab=vocab, cnn=cnn, lm=model, params=params,
                           batch_stats=batch_stats, image_size=data.image_size,
                           input_size=size, max_length=data.max_length, workdir=workdir)
  ranker = Ranker(loaded)
  result, *_ = rank_split(ranker, data, config.rank_num_images, config.eval_batch_size)
  result.update(split=split, train_seconds=round(time.time() - t_start, 1))
  if parallel.is_writer():
    write_result(os.path.join(workdir, FILE), result)
  print_table(result, say)
  return {**result, **flat(result)}
