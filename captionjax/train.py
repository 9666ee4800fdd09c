"""`captionjax train`: train a captioner, resuming from --workdir.

    captionjax train --workdir=runs/default [--config=NAME_OR_FILE] [--config.FIELD=VALUE ...]

The run has up to two phases, counted by one global step:
  1. `cnn_pretrain_steps` steps of object recognition (shapes only): the CNN
     and per-grid-cell heads for shape, color and size.
  2. `num_train_steps` caption steps. With `cached_features` the CNN is
     frozen and its features are computed once per image; otherwise images
     go through the CNN every step, frozen (no backward pass) until
     `finetune_cnn_after`, then trained with its own optimizer.
At the end the test split (and `extra_test_splits`) is captioned with beam
search into WORKDIR/captions.json and scored into WORKDIR/scores.json.

Running the same command again resumes exactly from the latest checkpoint
(state, step, RNG and input position; see captionjax/checkpoints.py), after
`kill -9` too. SIGTERM or SIGINT saves a checkpoint and exits (128 + signal);
a NaN/Inf loss, or one above 20x the first (NeuralTalk2's rule), stops the
run and keeps the good checkpoints. `--start_from=OTHER_WORKDIR` starts from
another run's model. Monitoring (captionjax/monitor.py): a progress bar,
train_log.jsonl, TensorBoard, and WORKDIR/plots/*.png.

Dimensions: B images per batch, S captions per image, L = max_length + 2,
D CNN feature size, V vocabulary size, G grid cells a side.
"""

import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from captionjax import checkpoints as ckpt_lib
from captionjax import configs
from captionjax import input_pipeline
from captionjax import monitor
from captionjax import records
from captionjax import vocab as vocab_lib

ALLOW_EXTRA_ARGS = True  # --config.FIELD=VALUE overrides
LOG_FILE = monitor.LOG_FILE
DIVERGENCE_FACTOR = 20.0  # stop when the loss exceeds this x the first loss (NeuralTalk2)
PHASE_PRETRAIN, PHASE_CAPTION = "cnn_pretrain", "caption"
LM_KEYS = ("img_embed", "lm")  # the captioner's parameters besides the CNN's


def add_arguments(p):
  p.add_argument("--workdir", required=True,
                 help="checkpoints, logs and results; an existing run there is resumed")
  p.add_argument("--config", default="default",
                 help="a config name in captionjax/configs or a config file path")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.add_argument("--start_from", default="",
                 help="initialize the model from another run's latest checkpoint "
                      "(NeuralTalk2's -start_from), e.g. to go on with CNN fine-tuning")


def run(args) -> int:
  overrides = []
  for item in args.extra:
    if not item.startswith("--config."):
      print(f"captionjax train: error: unrecognized argument {item}", file=sys.stderr)
      return 2
    overrides.append(item[len("--config."):])
  try:
    config = configs.load_config(args.config, overrides)
  except configs.ConfigError as e:
    print(f"captionjax train: error: {e}", file=sys.stderr)
    return 2
  error = lambda msg: print(f"captionjax train: error: {msg}", file=sys.stderr, flush=True)
  try:
    train_and_evaluate(config, args.workdir, progress=not args.no_progress,
                       start_from=args.start_from or None)
  except ckpt_lib.Preempted as e:
    print(f"captionjax train: {e}", file=sys.stderr, flush=True)
    return 128 + e.signum
  except monitor.Diverged as e:
    error(e)
    return 1
  except OSError as e:  # unwritable or full workdir, missing files
    error(_os_error_message(e, args.workdir))
    return 1
  except ValueError as e:  # bad config values, incompatible checkpoints, bad data
    error(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return 1
  return 0


def _os_error_message(e: OSError, workdir: str) -> str:
  """One line for an OSError, naming the file (or the workdir when it has none)."""
  import errno  # pylint: disable=g-import-not-at-top
  if e.filename is None and e.strerror is None:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  name = e.filename if e.filename is not None else workdir
  hint = " (free some space, or use another --workdir)" if e.errno == errno.ENOSPC else ""
  return f"{name}: {e.strerror or e}{hint}"


# ---------------------------------------------------------------- data


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


def load_data(config, data_dir: str, split: str) -> input_pipeline.SplitData:
  data = input_pipeline.load_split(data_dir, split)
  if config.blank_images:
    data.images = np.zeros_like(data.images) if data.decoded else data.images
    if not data.decoded:
      raise ValueError("blank_images needs a data set small enough to decode in memory")
  return data


def images_to_input(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


# ---------------------------------------------------------------- models


def attention_regions(model_config) -> int:
  """P, the regions the LM attends over: the cells of the CNN's pooling grid (0: none)."""
  if not model_config.get("attention", False):
    return 0
  kw = model_config.cnn_kwargs
  if model_config.cnn != "small_vgg" or kw.get("pool") != "grid":
    raise ValueError("config.model.attention needs model.cnn='small_vgg' with "
                     "model.cnn_kwargs.pool='grid' (the regions are its grid cells); "
                     "for other CNNs set --config.model.attention=False")
  return kw.get("grid", 2) ** 2


def make_models(config, vocab_size: int):
  """(cnn, lm, full): the CNN alone, the captioner on features, the whole captioner.

  `lm` is a Captioner with cnn="none" (img_embed + LSTM); its parameters plus
  the CNN's under "cnn" are exactly the parameters of `full`.
  """
  from captionjax.models import captioner as captioner_lib  # pylint: disable=g-import-not-at-top
  m = config.model
  kwargs = dict(vocab_size=vocab_size, input_encoding_size=m.input_encoding_size,
                rnn_size=m.rnn_size, num_layers=m.num_layers,
                drop_prob_lm=m.drop_prob_lm, rnn_type=m.rnn_type,
                image_every_step=m.get("image_every_step", False),
                attention_regions=attention_regions(m))
  cnn_kwargs = m.cnn_kwargs.to_dict()
  if m.get("cnn_weights"):  # imported VGG16 weights: the input normalization they expect
    from captionjax import weights  # pylint: disable=g-import-not-at-top
    if m.cnn != "vgg16":
      raise ValueError(f"config.model.cnn_weights needs config.model.cnn='vgg16', got {m.cnn!r}")
    if "preprocess" not in cnn_kwargs:  # else set in the config (checked when loaded)
      cnn_kwargs.update(weights.model_kwargs(m.cnn_weights))
  if m.cnn not in captioner_lib.CNNS:
    raise ValueError(f"config.model.cnn: unknown CNN {m.cnn!r} (one of {sorted(captioner_lib.CNNS)})")
  cnn = captioner_lib.CNNS[m.cnn](**cnn_kwargs)
  lm = captioner_lib.Captioner(cnn=captioner_lib.NO_CNN, **kwargs)
  full = captioner_lib.Captioner(cnn=m.cnn, cnn_kwargs=cnn_kwargs, **kwargs)
  return cnn, lm, full


class ObjectHeads:
  """Per-cell object classifiers on grid-pooled CNN features (CNN pretraining).

  features [B, G*G*C] -> logits shape [B, G, G, 7], color [B, G, G, 7], size [B, G, G, 2].
  With `hidden` > 0 a per-cell Dense + ReLU comes first; with 0 the heads are
  linear (the CNN's own per-cell fc layer, `cell_fc`, then plays that part, as
  VGG's classifier sits on fc7).
  """

  def __init__(self, grid: int, hidden: int = 256):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    from captionjax import shapes  # pylint: disable=g-import-not-at-top

    class Heads(nn.Module):
      @nn.compact
      def __call__(self, feats):
        b = feats.shape[0]
        x = feats.reshape(b, grid, grid, -1)  # -> [B, G, G, C]
        if hidden:
          x = nn.relu(nn.Dense(hidden, name="hidden")(x))
        return {"shape": nn.Dense(len(shapes.SHAPES) + 1, name="shape")(x),
                "color": nn.Dense(len(shapes.COLORS), name="color")(x),
                "size": nn.Dense(len(shapes.SIZES), name="size")(x)}

    self.module = Heads()


def cnn_variables(params, batch_stats):
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


# ---------------------------------------------------------------- optimizers


def lm_optimizer(config):
  """Adam with NeuralTalk2's settings: element-wise clipping, step halving."""
  import optax  # pylint: disable=g-import-not-at-top
  start, every = config.learning_rate_decay_start, config.learning_rate_decay_every
  if start >= 0:
    schedule = lambda step: config.learning_rate * 0.5 ** jnp.maximum(
        0, (step - start) // every + 1) * (step >= start) + config.learning_rate * (step < start)
  else:
    schedule = lambda step: config.learning_rate * jnp.ones_like(step, jnp.float32)
  tx = optax.chain(
      optax.clip(config.grad_clip),
      optax.scale_by_adam(b1=config.beta1, b2=config.beta2, eps=config.epsilon),
      optax.scale_by_schedule(lambda s: -schedule(s)))
  return tx, schedule


def cnn_optimizer(config):
  import optax  # pylint: disable=g-import-not-at-top
  return optax.chain(
      optax.clip(config.grad_clip),
      optax.add_decayed_weights(config.cnn_weight_decay),
      optax.adam(config.cnn_learning_rate, b1=config.cnn_beta1, b2=config.cnn_beta2,
                 eps=config.epsilon))


def pretrain_optimizer(config):
  import optax  # pylint: disable=g-import-not-at-top
  steps = max(config.cnn_pretrain_steps, 1)
  return optax.adam(optax.cosine_decay_schedule(config.cnn_pretrain_learning_rate, steps, 0.02))


# ---------------------------------------------------------------- steps


def make_pretrain_step(cnn, heads, tx):
  """(state, batch, rng) -> (state, metrics): one object-recognition step."""
  import optax  # pylint: disable=g-import-not-at-top

  def step(state, batch, rng):
    del rng
    def loss_fn(params):
      feats, upd = cnn.apply(cnn_variables(params["cnn"], state["batch_stats"]),
                             images_to_input(batch["image"]), train=True,
                             mutable=["batch_stats"])  # -> [B, G*G*C]
      logits = heads.apply({"params": params["heads"]}, feats)
      occupied = (batch["shape"] > 0).astype(jnp.float32)  # -> [B, G, G]
      ce = optax.softmax_cross_entropy_with_integer_labels
      loss = ce(logits["shape"], batch["shape"]).mean()
      loss += (ce(logits["color"], batch["color"]) * occupied).sum() / occupied.sum()
      loss += (ce(logits["size"], batch["size"]) * occupied).sum() / occupied.sum()
      right = ((logits["shape"].argmax(-1) == batch["shape"])
               & ((logits["color"].argmax(-1) == batch["color"])
                  & (logits["size"].argmax(-1) == batch["size"]) | (occupied == 0)))
      return loss, (upd["batch_stats"], right.all(axis=(1, 2)).sum())

    (loss, (bs, exact)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    n = batch["shape"].shape[0]
    metrics = {"loss_sum": loss * n, "count": jnp.float32(n), "exact_sum": exact.astype(jnp.float32)}
    return dict(state, step=state["step"] + 1, params=params, batch_stats=bs,
                opt_state=opt_state), metrics

  return step


def _caption_loss(lm, lm_params, feats, batch, train, rng):
  """Masked cross-entropy sums of the LM on features [B, D]."""
  from captionjax import losses  # pylint: disable=g-import-not-at-top
  logits = lm.apply({"params": lm_params}, feats, batch["captions"], train=train,
                    rngs={"dropout": rng} if train else None)  # -> [B, S, L-1, V+1]
  mask = batch["mask"][..., 1:]
  if "_mask" in batch:
    mask = mask * batch["_mask"][:, None, None]
  return losses.masked_cross_entropy(logits, batch["captions"][..., 1:], mask)


def make_caption_step(cnn, lm, tx_lm, tx_cnn, mode: str):
  """(state, batch, rng) -> (state, metrics): one caption step.

  mode "features": batch["features"] [B, D] (cached); "frozen": images through
  the CNN in inference mode, no gradient (XLA drops its backward pass);
  "finetune": the CNN trains too, with its own optimizer.
  """
  import optax  # pylint: disable=g-import-not-at-top

  def step(state, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])
    params = state["params"]
    trainable = {k: params[k] for k in LM_KEYS + (("cnn",) if mode == "finetune" else ())}

    def loss_fn(tp):
      bs = state["batch_stats"]
      if mode == "features":
        feats = batch["features"]
      elif mode == "frozen":
        feats = jax.lax.stop_gradient(cnn.apply(
            cnn_variables(params["cnn"], bs), images_to_input(batch["image"]), train=False))
      else:
        kw = {"mutable": ["batch_stats"]} if bs else {}
        out = cnn.apply(cnn_variables(tp["cnn"], bs), images_to_input(batch["image"]),
                        train=True, rngs={"dropout": jax.random.fold_in(rng, 1)}, **kw)
        feats, bs = (out[0], out[1]["batch_stats"]) if bs else (out, bs)
      loss_sum, count = _caption_loss(lm, {k: tp[k] for k in LM_KEYS}, feats, batch, True, rng)
      return loss_sum / jnp.maximum(count, 1.0), (loss_sum, count, bs)

    grads, (loss_sum, count, bs) = jax.grad(loss_fn, has_aux=True)(trainable)
    opt = dict(state["opt_state"])
    lm_part = {k: trainable[k] for k in LM_KEYS}
    upd, opt["lm"] = tx_lm.update({k: grads[k] for k in LM_KEYS}, opt["lm"], lm_part)
    new_params = dict(params, **optax.apply_updates(lm_part, upd))
    if mode == "finetune":
      upd, opt["cnn"] = tx_cnn.update(grads["cnn"], opt["cnn"], params["cnn"])
      new_params["cnn"] = optax.apply_updates(params["cnn"], upd)
    metrics = {"loss_sum": loss_sum, "count": count}
    return dict(state, step=state["step"] + 1, params=new_params, batch_stats=bs,
                opt_state=opt), metrics

  return step


def make_eval_step(cnn, lm, mode: str):
  """(params, batch_stats, batch) -> summed loss and token count over real examples."""
  def step(params, batch_stats, batch):
    feats = batch["features"] if mode == "features" else cnn.apply(
        cnn_variables(params["cnn"], batch_stats), images_to_input(batch["image"]), train=False)
    lm_params = {k: params[k] for k in LM_KEYS}
    loss_sum, count = _caption_loss(lm, lm_params, feats, batch, False, None)
    return {"loss_sum": loss_sum, "count": count}
  return step


def make_generate(cnn, lm, mode: str, beam_size: int, max_length: int, length_penalty=0.0,
                  temperature: float = 0.0):
  """(params, batch_stats, images or features[, rng]) -> (tokens [B, K, T], scores [B, K]).

  temperature > 0 samples one caption (K = 1) from softmax(logits / temperature)
  with `rng` instead of the greedy/beam search.
  """
  from captionjax import decode  # pylint: disable=g-import-not-at-top
  from captionjax.models.captioner import Captioner  # pylint: disable=g-import-not-at-top

  def generate(params, batch_stats, x, rng=None):
    feats = x if mode == "features" else cnn.apply(
        cnn_variables(params["cnn"], batch_stats), images_to_input(x), train=False)
    v = {"params": {k: params[k] for k in LM_KEYS}}
    emb = lm.apply(v, feats, method=Captioner.encode)  # -> [B, E]
    carry = lm.apply(v, emb, method=Captioner.decode_start)
    step_fn = lambda c, t: lm.apply(v, c, t, method=Captioner.decode_step)
    if temperature > 0:
      tokens, logprobs = decode.sample(step_fn, carry, rng, max_length, temperature)
      return tokens[:, None], logprobs[:, None]
    if beam_size == 1:
      tokens, logprobs = decode.greedy(step_fn, carry, max_length)
      return tokens[:, None], logprobs[:, None]
    return decode.beam_search(step_fn, carry, beam_size, max_length, length_penalty)

  return generate


def compute_features(cnn, params, batch_stats, splits: dict, batch_size: int,
                     mesh_put) -> dict:
  """The frozen CNN's features of every image of each split: name -> [N, D] float32.

  One jitted program serves every split (eval batches are padded to one shape).
  """
  fn = jax.jit(lambda p, bs, x: cnn.apply(cnn_variables(p, bs), images_to_input(x), train=False))
  features = {}
  for name, data in splits.items():
    out = []
    for batch in input_pipeline.eval_batches(data, batch_size, 1):
      f = fn(params, batch_stats, mesh_put(batch["image"]))
      out.append(np.asarray(f)[batch["_mask"] > 0])
    features[name] = np.concatenate(out)
  return features


# ---------------------------------------------------------------- evaluation


def caption_split(generate_fn, params, batch_stats, data, vocab, batch_size, mesh_put,
                  features=None, limit=None):
  """Captions every image of a split: list of {image_id, file_name, caption, logprob}."""
  out = []
  for batch in input_pipeline.eval_batches(data, batch_size, 1, limit=limit):
    x = features[batch["row"]] if features is not None else batch["image"]
    tokens, scores = generate_fn(params, batch_stats, mesh_put(x))
    tokens, scores = np.asarray(tokens), np.asarray(scores)  # host sync
    for i in np.nonzero(batch["_mask"])[0]:
      row = int(batch["row"][i])
      out.append({"image_id": int(data.image_id[row]), "file_name": data.file_name[row],
                  "caption": vocab.decode(tokens[i, 0]), "logprob": float(scores[i, 0])})
  return out


def references(data_dir: str, split: str) -> dict:
  """image_id -> list of raw reference captions."""
  with open(records.annotations_path(data_dir, split), encoding="utf-8") as f:
    anns = json.load(f)
  refs = {}
  for a in anns["annotations"]:
    refs.setdefault(a["image_id"], []).append(a["caption"])
  return refs


def score_captions(captions: list, refs: dict, data, metrics=("bleu", "rouge", "cider"),
                   meteor: bool = False) -> dict:
  """coco-caption scores of `captions`, plus hallucination_free when objects are known."""
  from captionjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  gts = {c["image_id"]: refs[c["image_id"]] for c in captions}
  res = {c["image_id"]: c["caption"] for c in captions}
  names = tuple(metrics) + (("meteor",) if meteor else ())
  scores = dict(metrics_lib.score(gts, res, metrics=names))
  objects = {int(i): o for i, o in zip(data.image_id, data.objects) if o is not None}
  if objects and all(c["image_id"] in objects for c in captions):
    from captionjax import shapes  # pylint: disable=g-import-not-at-top
    ok = [shapes.hallucination_free(c["caption"], objects[c["image_id"]]) for c in captions]
    scores["hallucination_free"] = float(np.mean(ok))
  scores["distinct_captions"] = len({c["caption"] for c in captions})
  return scores


def human_ceiling(refs: dict, image_ids) -> dict:
  """CIDEr-D and BLEU-4 of each image's first reference against its other references."""
  from captionjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  ids = [i for i in image_ids if len(refs[i]) > 1]
  gts = {i: refs[i][1:] for i in ids}
  res = {i: refs[i][0] for i in ids}
  s = metrics_lib.score(gts, res, metrics=("bleu", "cider"))
  return {"CIDEr": s["CIDEr"], "Bleu_4": s["Bleu_4"]}


# ---------------------------------------------------------------- the loop


def train_and_evaluate(config, workdir: str, progress: bool = True,
                       start_from: str | None = None) -> dict:
  """Trains (resuming from `workdir`), then captions and scores the test split.

  `start_from`: another run's workdir whose latest checkpoint initializes the
  model (not the optimizer or the step) when `workdir` has no checkpoint yet.
  Raises OSError (workdir), ValueError (config, data, checkpoints),
  monitor.Diverged and checkpoints.Preempted (SIGTERM/SIGINT, after saving).
  """
  t_start = time.time()
  say = lambda msg: print(msg, file=sys.stderr, flush=True)
  check_workdir(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints, cleanup=True)
  latest = ckpt.latest_step()
  if latest is not None:  # said first, before the slow parts
    say(f"resuming from step {latest}: {ckpt.path(latest)}")
  try:
    with ckpt_lib.StopOnSignal() as stop:  # SIGTERM/SIGINT: checkpoint and stop
      return _train_and_evaluate(config, workdir, progress, start_from, ckpt, latest, stop,
                                 t_start, say)
  except ckpt_lib.Preempted as e:
    if e.saved:
      raise
    # Outside the training loop (startup, evaluation, final captioning): stop at once.
    last = ckpt.latest_step()
    raise ckpt_lib.Preempted(e.signum, f"{e} before a new checkpoint; " + (
        f"the last one is {ckpt.path(last)}; run the same command to resume"
        if last is not None else "none saved yet")) from None
  finally:
    ckpt.manager.close()


def _restore_meta(ckpt, step: int) -> dict:
  try:
    return ckpt.restore_meta(step)
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
    raise ckpt_lib.CheckpointError(
        f"{ckpt.path(step)}: unreadable checkpoint ({ckpt_lib._first_line(e)})") from None  # pylint: disable=protected-access


def load_start_from(other: str, config, vocab, params, batch_stats, say):
  """(params, batch_stats) with what another run's latest checkpoint has of them.

  The model and vocabulary must match; the optimizer state and the step are
  not taken (NeuralTalk2's -start_from).
  """
  if not os.path.isdir(os.path.join(other, "checkpoints")):
    raise ckpt_lib.CheckpointError(f"--start_from={other}: no checkpoints/ directory there")
  src = ckpt_lib.Checkpointer(other, keep=10**6)  # opened read-only: saves nothing, prunes nothing
  try:
    step = src.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"--start_from={other}: no checkpoint saved there yet")
    meta = _restore_meta(src, step)
    ckpt_lib.check_compatible(meta, config, vocab, f"--start_from={src.path(step)}")
    try:
      saved = src.restore(step, None)  # as saved: numpy arrays
    except Exception as e:  # pylint: disable=broad-except
      raise ckpt_lib.CheckpointError(f"--start_from={src.path(step)}: cannot restore "
                                     f"({ckpt_lib._first_line(e)})") from None  # pylint: disable=protected-access
  finally:
    src.manager.close()
  params = dict(params)
  loaded = [k for k in params if k in saved["params"]]
  for k in loaded:
    params[k] = jax.tree_util.tree_map(lambda a, b: jnp.asarray(b, a.dtype),
                                       params[k], saved["params"][k])
  if saved.get("batch_stats"):
    batch_stats = jax.tree_util.tree_map(lambda a, b: jnp.asarray(b, a.dtype),
                                         batch_stats, saved["batch_stats"])
  say(f"start_from: {', '.join(loaded)} from {src.path(step)} ({meta.get('phase')} phase, "
      f"step {step}); optimizer and step start afresh")
  return params, batch_stats


def check_free_space(workdir: str, state, factor: float = 2.0) -> None:
  """OSError(ENOSPC) if the workdir cannot hold `factor` checkpoints of `state`."""
  import errno  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  need = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state)) * factor
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise OSError(errno.ENOSPC, f"no space left on device: {free / 2**20:.0f} MiB free, "
                  f"{factor:g} checkpoints need about {need / 2**20:.0f} MiB", workdir)


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that a file can be written there (OSError if not)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OSError(e.errno, f"--workdir is not writable ({e.strerror})", workdir) from None


def _train_and_evaluate(config, workdir, progress, start_from, ckpt, latest, stop, t_start,
                        say) -> dict:
  """train_and_evaluate's body, with the checkpointer and signal handlers in place."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  # ---- mesh: the batch is split over a "data" axis; one device is the trivial mesh.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  if config.batch_size % jax.device_count():
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"the {jax.device_count()} devices")
  local_batch = config.batch_size // jax.process_count()

  def mesh_put(x):
    return jax.make_array_from_process_local_data(data_sharding, np.asarray(x))

  # ---- input
  data_dir = data_dir_for(config)
  info = records.load_info(data_dir)
  vocab = vocab_lib.Vocabulary.load(data_dir)
  max_length = info["max_length"]
  train_data = load_data(config, data_dir, "train")
  val_data = load_data(config, data_dir, "val") if "val" in info["splits"] else None
  say(f"data: {data_dir}: {len(train_data)} training images, vocabulary {len(vocab)}")

  # ---- model
  cnn, lm, full = make_models(config, len(vocab))
  rng = jax.random.PRNGKey(config.seed)
  init_rng, heads_rng, lm_rng, train_rng = jax.random.split(rng, 4)
  size = config.crop_size or info["image_size"]
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  cnn_vars = cnn.init({"params": init_rng, "dropout": init_rng}, dummy, train=False)
  feat_dim = jax.eval_shape(lambda v: cnn.apply(v, dummy), cnn_vars).shape[-1]
  lm_vars = lm.init(lm_rng, jnp.zeros((1, feat_dim)), jnp.zeros((1, 1, max_length + 2), jnp.int32))
  params = {"cnn": cnn_vars["params"], **lm_vars["params"]}
  if config.model.get("cnn_weights"):
    from captionjax import weights  # pylint: disable=g-import-not-at-top
    params["cnn"] = weights.load_params(config.model.cnn_weights, params["cnn"], cnn.preprocess)
    say(f"CNN: imported weights from {config.model.cnn_weights}")
  batch_stats = cnn_vars.get("batch_stats", {})
  # ---- an existing checkpoint must fit this config and vocabulary; or --start_from
  meta = None
  if latest is not None:
    meta = _restore_meta(ckpt, latest)
    for k, a, b in ckpt_lib.check_compatible(meta, config, vocab, ckpt.path(latest)):
      say(f"note: config.{k} changed since the checkpoint: {a!r} -> {b!r}")
  elif start_from:
    params, batch_stats = load_start_from(start_from, config, vocab, params, batch_stats, say)
  started_from = meta.get("started_from") if meta is not None else start_from
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  vocab.save(os.path.join(workdir, "vocab.json"))

  pretrain = config.cnn_pretrain_steps if all(o is not None for o in train_data.objects) else 0
  if config.cnn_pretrain_steps and not pretrain:
    say("note: the data set has no object labels; CNN pretraining skipped")
  if started_from:  # the CNN comes from the other run
    pretrain = 0
  total_steps = pretrain + config.num_train_steps
  heads = None
  if pretrain:  # linear heads on the CNN's own per-cell fc layer, else a hidden layer
    hidden = 0 if config.model.cnn_kwargs.get("cell_fc", 0) else 256
    heads = ObjectHeads(config.model.cnn_kwargs.get("grid", 1), hidden).module
  tx_pre = pretrain_optimizer(config)
  tx_lm, lr_schedule = lm_optimizer(config)
  tx_cnn = cnn_optimizer(config)

  def pretrain_state():
    hp = heads.init(heads_rng, jnp.zeros((1, feat_dim)))["params"]
    p = {"cnn": params["cnn"], "heads": hp}
    return {"step": jnp.int32(0), "params": p, "batch_stats": batch_stats,
            "opt_state": tx_pre.init(p)}

  def caption_state(p, bs, step):
    lm_part = {k: p[k] for k in LM_KEYS}
    return {"step": jnp.int32(step), "params": p, "batch_stats": bs,
            "opt_state": {"lm": tx_lm.init(lm_part), "cnn": tx_cnn.init(p["cnn"])}}

  # ---- checkpoint: resume if there is one (exactly: state, step, RNG, input position)
  step, position, first_loss = 0, 0, {}  # position: examples of this phase consumed
  state = pretrain_state() if pretrain else caption_state(params, batch_stats, 0)
  if latest is not None:
    if meta["phase"] == PHASE_CAPTION and pretrain:
      state = caption_state(params, batch_stats, 0)
    try:
      state = ckpt.restore(latest, state)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
      raise ckpt_lib.CheckpointError(
          f"{ckpt.path(latest)}: cannot restore ({ckpt_lib._first_line(e)}): "  # pylint: disable=protected-access
          "use a new --workdir or delete that step") from None
    step = int(meta["step"])
    position = int(meta.get("data_position", 0))
    first_loss = dict(meta.get("first_loss", {}))
    if meta.get("rng") is not None:
      train_rng = jnp.asarray(meta["rng"], jnp.uint32)
    say(f"resumed at step {step} of {total_steps} ({meta['phase']} phase, input position "
        f"{position})")
  check_free_space(workdir, state)
  state = jax.device_put(state, replicated)
  logger = monitor.Logger(workdir)
  saved_step = latest

  def save(state, phase):
    nonlocal saved_step
    host = jax.tree_util.tree_map(np.array, jax.device_get(state))  # host sync
    bad = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path(host)
           if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all()]
    if bad:
      raise monitor.Diverged(f"step {step}: non-finite values in {bad[0]}")
    ckpt.save(step, host, {"step": step, "phase": phase, "vocab_size": len(vocab),
                           "vocab_digest": ckpt_lib.vocab_digest(vocab.words),
                           "image_size": info["image_size"], "max_length": max_length,
                           "data_position": position, "rng": np.asarray(train_rng).tolist(),
                           "first_loss": first_loss, "started_from": started_from or None,
                           "config": config.to_dict()})
    saved_step = step

  def run_phase(name, state, step_fn, first, last, batch_fn, eval_fn=None):
    """Runs global steps [first, last) of one phase; returns the state.

    Checkpoints every `checkpoint_every_steps` and at the end; on SIGTERM or
    SIGINT checkpoints at once and raises Preempted; on a diverging loss
    raises monitor.Diverged (the checkpoints on disk are all good ones).
    """
    nonlocal step, position
    it = input_pipeline.TrainIterator(
        train_data, local_batch, seq_per_img=config.seq_per_img, seed=config.seed,
        start=position if step > first else 0, crop_size=config.crop_size, flip=config.flip,
        process_index=jax.process_index(), process_count=jax.process_count())
    step_fn.__name__ = f"{name}_train_step"  # names the compiled program in jax.log_compiles
    jstep = jax.jit(step_fn, donate_argnums=(0,))
    acc, t_log, n_log, compiling = None, time.time(), 0, True
    bar = tqdm(total=last - first, initial=step - first, desc=name, unit="step",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    loss_of = lambda m: float(m["loss_sum"]) / max(float(m["count"]), 1.0)
    lr_at = jax.jit(lr_schedule)  # compiled once (eager calls compile per halving count)
    stop.in_loop = True
    try:
      while step < last:
        batch = {k: mesh_put(v) for k, v in batch_fn(next(it)).items()}
        t0 = time.time()
        state, metrics = jstep(state, batch, train_rng)
        if compiling:  # the first step compiles: time it, and keep it out of images/s
          jax.block_until_ready(state)
          logger.log(step, {"phase": name, "compile_seconds": round(time.time() - t0, 2)})
          compiling, t_log = False, time.time()
          loss0 = loss_of(metrics)
          monitor.check_loss(loss0, None, where=f"step {step + 1}: ")
          first_loss.setdefault(name, loss0)  # NeuralTalk2's reference for divergence
        acc = metrics if acc is None else jax.tree_util.tree_map(jnp.add, acc, metrics)
        step += 1
        position = it.position
        n_log += 1
        bar.update()
        checkpoint = step % config.checkpoint_every_steps == 0 or step == last
        if step % config.log_every_steps == 0 or step == last:
          m = jax.device_get(acc)  # host sync, only on logging steps
          dt = time.time() - t_log
          rec = {"phase": name, "loss": loss_of(m),
                 "images_per_s": round(n_log * config.batch_size / dt, 1)}
          if "exact_sum" in m:
            rec["exact_scene_accuracy"] = float(m["exact_sum"] / (n_log * config.batch_size))
          if name == PHASE_CAPTION:
            rec["learning_rate"] = float(lr_at(np.int32(step - first)))
          else:
            rec["learning_rate"] = float(config.cnn_pretrain_learning_rate)
          logger.log(step, rec)
          bar.set_postfix(loss=f"{rec['loss']:.3f}", img_s=rec["images_per_s"])
          acc, t_log, n_log = None, time.time(), 0
          monitor.check_loss(rec["loss"], first_loss.get(name), DIVERGENCE_FACTOR,
                             where=f"step {step}: ")
        elif checkpoint or stop.requested:  # never save past a loss not yet checked
          monitor.check_loss(loss_of(jax.device_get(acc)), first_loss.get(name),
                             DIVERGENCE_FACTOR, where=f"step {step}: ")
        if checkpoint or stop.requested:
          save(state, name)
        if eval_fn is not None and (step % config.eval_every_steps == 0 or step == last):
          rec = eval_fn(state)
          if rec and saved_step == step:  # the best checkpoint is kept beside the latest
            if "val_CIDEr" in rec:
              ckpt.record_score(step, rec["val_CIDEr"], "val_CIDEr")
            else:
              ckpt.record_score(step, -rec["val_loss"], "-val_loss")
          refresh_plots()
        if stop.requested:
          ckpt.wait()
          sig = signal.Signals(stop.requested).name
          raise ckpt_lib.Preempted(stop.requested, (
              f"stopped by {sig} at step {step} of {total_steps}: checkpoint "
              f"{ckpt.path(step)} saved; run the same command to resume"), saved=True)
    except monitor.Diverged as e:
      ckpt.wait()
      good = ckpt.latest_step()
      raise monitor.Diverged(
          f"training diverged: {e}; stopped. The last good checkpoint is "
          + (ckpt.path(good) if good is not None else "none (none saved yet)")) from None
    finally:
      stop.in_loop = False
      bar.close()
    return state

  def refresh_plots():
    try:
      monitor.plot_curves(workdir)
    except ImportError as e:  # matplotlib missing: plots are optional
      say(f"note: no plots ({e})")
    logger.flush()

  # ---- phase 1: the CNN learns the objects
  if pretrain and step < pretrain:
    from captionjax import shapes  # pylint: disable=g-import-not-at-top
    targets = shapes.object_targets(train_data.objects, config.model.cnn_kwargs.grid)

    def pre_batch(b):
      return {"image": b["image"], **{k: v[b["row"]] for k, v in targets.items()}}

    say(f"phase 1: CNN object pretraining, {pretrain} steps")
    state = run_phase(PHASE_PRETRAIN, state, make_pretrain_step(cnn, heads, tx_pre),
                      0, pretrain, pre_batch)
  if pretrain and "heads" in state["params"]:
    p = jax.device_get(state["params"])
    state = jax.device_put(caption_state(
        {**params, "cnn": p["cnn"]}, jax.device_get(state["batch_stats"]), step), replicated)

  # ---- phase 2: captions
  mode = "features" if config.cached_features else "frozen"
  features = {}
  if mode == "features":
    if config.finetune_cnn_after >= 0:
      raise ValueError("cached_features=True freezes the CNN: set finetune_cnn_after=-1")
    t0 = time.time()
    splits = {"train": train_data, **({"val": val_data} if val_data is not None else {})}
    features = compute_features(cnn, state["params"]["cnn"], state["batch_stats"], splits,
                                config.eval_batch_size, mesh_put)
    say(f"features: {features['train'].shape} computed in {time.time() - t0:.1f}s")

  def cap_batch(b):
    out = {"captions": b["captions"], "mask": b["mask"]}
    if mode == "features":
      out["features"] = features["train"][b["row"]]
    else:
      out["image"] = b["image"]
    return out

  val_refs = references(data_dir, "val") if val_data is not None else None

  def make_eval(mode):
    eval_step = jax.jit(make_eval_step(cnn, lm, mode))
    greedy = jax.jit(make_generate(cnn, lm, mode, 1, max_length + 1))

    def evaluate(state):
      if val_data is None:
        return
      sums = {"loss_sum": 0.0, "count": 0.0}
      feats = features.get("val")
      for b in input_pipeline.eval_batches(val_data, config.eval_batch_size, config.seq_per_img):
        x = {"captions": b["captions"], "mask": b["mask"], "_mask": b["_mask"]}
        if feats is not None:
          x["features"] = feats[b["row"]]
        else:
          x["image"] = b["image"]
        m = eval_step(state["params"], state["batch_stats"], {k: mesh_put(v) for k, v in x.items()})
        sums = {k: sums[k] + float(m[k]) for k in sums}
      val_loss = sums["loss_sum"] / max(sums["count"], 1)
      caps = caption_split(greedy, state["params"], state["batch_stats"], val_data, vocab,
                           config.eval_batch_size, mesh_put, feats, limit=config.eval_num_images)
      scores = score_captions(caps, val_refs, val_data)
      rec = {"phase": "val", "val_loss": val_loss, "val_perplexity": float(np.exp(val_loss)),
             **{f"val_{k}": v for k, v in scores.items()}}
      logger.log(step, rec, echo=lambda s: (tqdm.write(s, file=sys.stderr)))
      logger.text(step, "val_samples", "\n\n".join(
          f"{c['file_name']}: {c['caption']}" for c in caps[:8]))
      return rec
    return evaluate

  if step < total_steps:
    ft = config.finetune_cnn_after
    ft_start = pretrain + (ft if ft >= 0 else config.num_train_steps)
    say(f"phase 2: caption training, {config.num_train_steps} steps ({mode} CNN)")
    if step < ft_start:
      state = run_phase(PHASE_CAPTION, state, make_caption_step(cnn, lm, tx_lm, tx_cnn, mode),
                        pretrain, min(ft_start, total_steps), cap_batch, make_eval(mode))
    if step < total_steps:
      say(f"fine-tuning the CNN from step {step}")
      mode = "finetune"
      state = run_phase(PHASE_CAPTION, state, make_caption_step(cnn, lm, tx_lm, tx_cnn, mode),
                        pretrain, total_steps, cap_batch, make_eval("frozen"))
  ckpt.wait()  # the last checkpoint is on disk

  # ---- final: caption the test split(s) with beam search and score
  params = jax.device_get(state["params"])
  bstats = jax.device_get(state["batch_stats"])
  gen = jax.jit(make_generate(cnn, lm, "frozen", config.beam_size, max_length + 1,
                              config.length_penalty))
  results = {}
  splits = [config.test_split] + [s for s in config.extra_test_splits if s in info["splits"]]
  for split in splits:
    if split not in info["splits"]:
      say(f"note: no split {split!r} to test on")
      continue
    data = load_data(config, data_dir, split)
    t0 = time.time()
    caps = caption_split(gen, params, bstats, data, vocab, config.eval_batch_size, mesh_put)
    dt = time.time() - t0
    refs = references(data_dir, split)
    scores = score_captions(caps, refs, data, meteor=True)
    scores["images_per_s"] = round(len(caps) / dt, 1)
    if split == config.test_split:
      with open(os.path.join(workdir, "captions.json"), "w", encoding="utf-8") as f:
        json.dump(caps, f, ensure_ascii=False, indent=0)
      scores["human_ceiling"] = human_ceiling(refs, [c["image_id"] for c in caps])
    results[split] = scores
  results["beam_size"] = config.beam_size
  results["train_seconds"] = round(time.time() - t_start, 1)
  test_scores = results.get(config.test_split, {})
  out = {**test_scores, "splits": results}
  with open(os.path.join(workdir, "scores.json"), "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  logger.log(step, {"phase": "test", **{k: v for k, v in test_scores.items()
                                        if isinstance(v, (int, float))}}, echo=say)
  refresh_plots()
  logger.close()
  return out
