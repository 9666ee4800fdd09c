"""The pure, jittable steps of training and inference.

Each factory takes the flax modules (and optimizers) and returns a pure
function for `jax.jit`; nothing that changes between calls is closed over:

  make_pretrain_step  (state, batch, rng) -> (state, metrics)  CNN object recognition
  make_caption_step   (state, batch, rng) -> (state, metrics)  the captioner's train_step
  make_ranking_step   (state, batch, rng) -> (state, metrics)  the alignment model's
                      (models/ranking.py; make_head_step picks by config.model.kind)
  make_eval_step      (params, batch_stats, batch) -> metrics  validation loss
  make_generate       (params, batch_stats, x[, rng, bad_endings]) -> (tokens, scores)
                      greedy, sampling or (diverse) beam search (captionjax/decode.py)
  make_ensemble_generate  the same for several models, log-probabilities averaged
  make_scst_sample    (state, batch, rng) -> K sampled captions per image (+ greedy)
  make_scst_step      (state, batch, rng) -> (state, metrics)  the policy-gradient update
                      (self-critical training: captionjax/scst.py runs the two around
                      the host's reward)

The train state is a dict: {"step", "params", "batch_stats", "opt_state"}.
Metrics are sums plus a count (`loss_sum`, `count`); the host divides.

Dimensions: B images per batch, S captions per image, L = max_length + 2,
D CNN feature size, V vocabulary size, G grid cells a side, K beams (or
sampled captions per image), T decoded tokens (max_length + 1).
"""

import jax
import jax.numpy as jnp
import optax

from captionjax import decode
from captionjax import losses
from captionjax.models import build
from captionjax.models import ranking as ranking_lib
from captionjax.models.build import LM_KEYS, cnn_variables, images_to_input
from captionjax.models.captioner import Captioner


def make_pretrain_step(cnn, heads, tx):
  """(state, batch, rng) -> (state, metrics): one object-recognition step.

  batch: "image" uint8 [B, H, W, 3]; "shape", "color", "size" int32 [B, G, G]
  (shape 0 = an empty cell, whose color and size do not count).
  """

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


def caption_loss(lm, lm_params, feats, batch, train, rng):
  """(loss_sum, count): masked cross-entropy of the LM on features [B, D].

  batch: "captions" int32 [B, S, L], "mask" [B, S, L], optionally "_mask" [B]
  (0 for padding images in evaluation).
  """
  logits = lm.apply({"params": lm_params}, feats, batch["captions"], train=train,
                    rngs={"dropout": rng} if train else None)  # -> [B, S, L-1, V+1]
  mask = batch["mask"][..., 1:]
  if "_mask" in batch:
    mask = mask * batch["_mask"][:, None, None]
  return losses.masked_cross_entropy(logits, batch["captions"][..., 1:], mask)


def _features(cnn, params, batch_stats, batch, mode):
  """[B, D]: cached features, or the frozen CNN on the batch's images."""
  if mode == "features":
    return batch["features"]
  feats = cnn.apply(cnn_variables(params["cnn"], batch_stats),
                    images_to_input(batch["image"]), train=False)
  return jax.lax.stop_gradient(feats)


def make_caption_step(cnn, lm, tx_lm, tx_cnn, mode: str):
  """(state, batch, rng) -> (state, metrics): one caption step.

  mode "features": batch["features"] [B, D] (cached); "frozen": images through
  the CNN in inference mode, no gradient (XLA drops its backward pass);
  "finetune": the CNN trains too, with its own optimizer.
  """
  loss = lambda hp, feats, batch, rng: caption_loss(lm, hp, feats, batch, True, rng)
  return _head_step(cnn, loss, LM_KEYS, tx_lm, tx_cnn, mode)


def ranking_loss(model, params, feats, batch, margin: float):
  """(loss_sum, count): the alignment model's max-margin loss on a batch.

  batch: "captions" int32 [B, S, L]: sentence b*S + s belongs to image b;
  optionally "_mask" [B] (0 for padding images in evaluation: no pair counts).
  """
  b, s, _ = batch["captions"].shape
  scores = model.apply({"params": params}, feats, batch["captions"])  # -> [B*S, B]
  image_of = jnp.arange(b * s) // s  # -> [B*S]
  return ranking_lib.max_margin_loss(scores, image_of, margin, batch.get("_mask"))


def make_ranking_step(cnn, model, tx, tx_cnn, mode: str, margin: float = 1.0):
  """(state, batch, rng) -> (state, metrics): one step of the alignment model.

  As make_caption_step (the same modes), the loss being `ranking_loss`.
  """
  loss = lambda hp, feats, batch, rng: ranking_loss(model, hp, feats, batch, margin)
  return _head_step(cnn, loss, ranking_lib.SCORE_KEYS, tx, tx_cnn, mode)


def make_head_step(config, cnn, lm, tx_lm, tx_cnn, mode: str):
  """The training step of config.model.kind: make_caption_step or make_ranking_step."""
  if build.model_kind(config) == "ranking":
    return make_ranking_step(cnn, lm, tx_lm, tx_cnn, mode, config.ranking_margin)
  return make_caption_step(cnn, lm, tx_lm, tx_cnn, mode)


def _head_step(cnn, loss, keys, tx_head, tx_cnn, mode: str):
  """The step that trains the parameters `keys` on CNN features (and the CNN with
  mode "finetune"): loss(head params, feats [B, D], batch, rng) -> (loss_sum, count)."""

  def step(state, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])
    params = state["params"]
    trainable = {k: params[k] for k in keys + (("cnn",) if mode == "finetune" else ())}

    def loss_fn(tp):
      bs = state["batch_stats"]
      if mode != "finetune":
        feats = _features(cnn, params, bs, batch, mode)
      else:
        kw = {"mutable": ["batch_stats"]} if bs else {}
        out = cnn.apply(cnn_variables(tp["cnn"], bs), images_to_input(batch["image"]),
                        train=True, rngs={"dropout": jax.random.fold_in(rng, 1)}, **kw)
        feats, bs = (out[0], out[1]["batch_stats"]) if bs else (out, bs)
      loss_sum, count = loss({k: tp[k] for k in keys}, feats, batch, rng)
      return loss_sum / jnp.maximum(count, 1.0), (loss_sum, count, bs)

    grads, (loss_sum, count, bs) = jax.grad(loss_fn, has_aux=True)(trainable)
    new_params, opt = _update(state, params, trainable, grads, tx_head, tx_cnn, mode, keys)
    metrics = {"loss_sum": loss_sum, "count": count}
    return dict(state, step=state["step"] + 1, params=new_params, batch_stats=bs,
                opt_state=opt), metrics

  return step


def _update(state, params, trainable, grads, tx_lm, tx_cnn, mode: str, keys=LM_KEYS):
  """(params, opt_state) after one optimizer step of the head, `keys` of the params (the
  LM, or the alignment model), and of the CNN when fine-tuned."""
  opt = dict(state["opt_state"])
  lm_part = {k: trainable[k] for k in keys}
  upd, opt["lm"] = tx_lm.update({k: grads[k] for k in keys}, opt["lm"], lm_part)
  new_params = dict(params, **optax.apply_updates(lm_part, upd))
  if mode == "finetune":
    upd, opt["cnn"] = tx_cnn.update(grads["cnn"], opt["cnn"], params["cnn"])
    new_params["cnn"] = optax.apply_updates(params["cnn"], upd)
  return new_params, opt


def make_eval_step(cnn, lm, mode: str, config=None):
  """(params, batch_stats, batch) -> summed loss and token count over real examples
  (with a ranking `config`: the alignment model's loss and its positive pairs)."""
  def step(params, batch_stats, batch):
    if config is not None and build.model_kind(config) == "ranking":
      feats = _features(cnn, params, batch_stats, batch, mode)
      hp = {k: params[k] for k in ranking_lib.SCORE_KEYS}
      loss_sum, count = ranking_loss(lm, hp, feats, batch, config.ranking_margin)
      return {"loss_sum": loss_sum, "count": count}
    feats = _features(cnn, params, batch_stats, batch, mode)
    lm_params = {k: params[k] for k in LM_KEYS}
    loss_sum, count = caption_loss(lm, lm_params, feats, batch, False, None)
    return {"loss_sum": loss_sum, "count": count}
  return step


def _decoder_start(cnn, lm, mode, params, batch_stats, x):
  """(carry, step_fn) of one captioner on images or features x: the image step."""
  feats = x if mode == "features" else cnn.apply(
      cnn_variables(params["cnn"], batch_stats), images_to_input(x), train=False)
  v = {"params": {k: params[k] for k in LM_KEYS}}
  emb = lm.apply(v, feats, method=Captioner.encode)  # -> [B, E]
  carry = lm.apply(v, emb, method=Captioner.decode_start)
  step_fn = lambda c, t: lm.apply(v, c, t, method=Captioner.decode_step)
  return carry, step_fn


def make_generate(cnn, lm, mode: str, options: decode.DecodeOptions, max_length: int):
  """(params, batch_stats, images or features[, rng, bad_endings]) -> (tokens [B, C, T], scores [B, C]).

  Decodes as `options` say (decode.decode; C = options.num_captions): `rng`
  to sample, `bad_endings` the bool [V+1] mask of options.bad_endings.
  """

  def generate(params, batch_stats, x, rng=None, bad_endings=None):
    carry, step_fn = _decoder_start(cnn, lm, mode, params, batch_stats, x)
    return decode.decode(step_fn, carry, max_length, options, rng, bad_endings)

  return generate


def make_ensemble_generate(members, options: decode.DecodeOptions, max_length: int):
  """As make_generate for an ensemble: members [(cnn, lm)] sharing a vocabulary,
  params and batch_stats tuples of theirs, images in. Each step averages the
  members' log-probabilities (decode.ensemble_step): one step function, one
  jitted program."""

  def generate(params, batch_stats, images, rng=None, bad_endings=None):
    starts = [_decoder_start(cnn, lm, "frozen", p, bs, images)
              for (cnn, lm), p, bs in zip(members, params, batch_stats)]
    step_fn = decode.ensemble_step([fn for _, fn in starts])
    carry = tuple(c for c, _ in starts)
    return decode.decode(step_fn, carry, max_length, options, rng, bad_endings)

  return generate


# ---------------------------------------------------------------- self-critical training


def make_scst_sample(cnn, lm, mode: str, num_samples: int, max_length: int, greedy: bool):
  """(state, batch, rng) -> {"samples" [B, K, T], "logprobs" [B, K], "features" [B, D]
  (, "greedy" [B, T])}: K captions sampled per image, and the greedy caption.

  The image goes through the CNN (modes "frozen", "finetune"; inference mode)
  and the embedding once; the carry is tiled K times (row b*K + k is sample k
  of image b). The random key is folded with the state's step: each step
  samples anew, the same after a resume. The policy is the LM without dropout.
  """

  def sample(state, batch, rng):
    params = state["params"]
    rng = jax.random.fold_in(jax.random.fold_in(rng, state["step"]), 2)
    feats = batch["features"] if mode == "features" else cnn.apply(
        cnn_variables(params["cnn"], state["batch_stats"]), images_to_input(batch["image"]),
        train=False)  # -> [B, D]
    feats = jax.lax.stop_gradient(feats)
    v = {"params": {k: params[k] for k in LM_KEYS}}
    carry = lm.apply(v, lm.apply(v, feats, method=Captioner.encode),
                     method=Captioner.decode_start)
    step_fn = lambda c, t: lm.apply(v, c, t, method=Captioner.decode_step)
    b = feats.shape[0]
    tiled = jax.tree_util.tree_map(lambda x: jnp.repeat(x, num_samples, axis=0), carry)
    tokens, logprobs = decode.sample(step_fn, tiled, rng, max_length)  # -> [B*K, T], [B*K]
    out = {"samples": tokens.reshape(b, num_samples, max_length),
           "logprobs": logprobs.reshape(b, num_samples), "features": feats}
    if greedy:
      out["greedy"] = decode.greedy(step_fn, carry, max_length)[0]  # -> [B, T]
    return out

  return sample


def sequence_mask(tokens):
  """[..., T] -> float32 [..., T]: 1 up to and including the first END (0)."""
  alive = jnp.cumprod((tokens != decode.END_ID).astype(jnp.int32), axis=-1)  # -> [..., T]
  return jnp.concatenate([jnp.ones_like(alive[..., :1]), alive[..., :-1]], -1).astype(jnp.float32)


def sample_logprobs(lm, lm_params, feats, samples):
  """Summed log-probabilities [B, K] of sampled captions [B, K, T] under the LM.

  Teacher forcing: the LM's training forward on [START, samples] (no dropout)
  gives every position's logits at once; positions after the first END are
  masked. Equals the sampler's logprobs, with gradients.
  """
  b, k, _ = samples.shape
  captions = jnp.concatenate([jnp.zeros((b, k, 1), samples.dtype), samples], -1)  # -> [B, K, T+1]
  logits = lm.apply({"params": lm_params}, feats, captions, train=False)  # -> [B, K, T, V+1]
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
  token_logp = jnp.take_along_axis(logp, samples[..., None], -1)[..., 0]  # -> [B, K, T]
  return jnp.sum(token_logp * sequence_mask(samples), -1)


def scst_loss(lm, lm_params, feats, samples, advantage):
  """(loss_sum, count): the policy-gradient loss -sum_{b,k} A[b,k] * log p(sample[b,k]).

  advantage [B, K] is a constant (reward minus baseline); count = B*K, so
  loss_sum / count is -mean(A * log p), REINFORCE with a baseline.
  """
  logp = sample_logprobs(lm, lm_params, feats, samples)  # -> [B, K]
  adv = jax.lax.stop_gradient(advantage).astype(logp.dtype)
  return -jnp.sum(adv * logp), jnp.float32(logp.size)


def make_scst_step(cnn, lm, tx_lm, tx_cnn, mode: str, xe_weight: float = 0.0):
  """(state, batch, rng) -> (state, metrics): one self-critical update.

  batch: "samples" int32 [B, K, T], "advantage" [B, K], and "features" [B, D]
  (modes "features", "frozen": the sampler's features) or "image" (mode
  "finetune": the CNN, in inference mode as when sampling, gets gradients
  and its own optimizer; its BatchNorm statistics stay as they are).

  xe_weight > 0 (the mixed objective): the loss adds xe_weight x the
  cross-entropy per word of batch "captions" [B, S, L] ("mask" [B, S, L]),
  the reference captions, with dropout as in the caption phase; the metrics
  then add "xe_sum" and "xe_count".
  """

  def step(state, batch, rng):
    params = state["params"]
    trainable = {k: params[k] for k in LM_KEYS + (("cnn",) if mode == "finetune" else ())}
    rng = jax.random.fold_in(jax.random.fold_in(rng, state["step"]), 3)

    def loss_fn(tp):
      feats = batch["features"] if mode != "finetune" else cnn.apply(
          cnn_variables(tp["cnn"], state["batch_stats"]), images_to_input(batch["image"]),
          train=False)
      lm_params = {k: tp[k] for k in LM_KEYS}
      loss_sum, count = scst_loss(lm, lm_params, feats, batch["samples"], batch["advantage"])
      aux = {"loss_sum": loss_sum, "count": count}
      loss = loss_sum / count
      if xe_weight:
        aux["xe_sum"], aux["xe_count"] = caption_loss(lm, lm_params, feats, batch, True, rng)
        loss += xe_weight * aux["xe_sum"] / aux["xe_count"]
      return loss, aux

    grads, metrics = jax.grad(loss_fn, has_aux=True)(trainable)
    new_params, opt = _update(state, params, trainable, grads, tx_lm, tx_cnn, mode)
    return dict(state, step=state["step"] + 1, params=new_params, opt_state=opt), metrics

  return step
