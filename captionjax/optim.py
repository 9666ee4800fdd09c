"""The optimizers of the training phases, built from the config.

  lm_optimizer       the language model (and image embedding): Adam with
                     NeuralTalk2's element-wise gradient clipping and its
                     step-halving learning rate
  cnn_optimizer      the CNN while it is fine-tuned: its own Adam and weight decay
  pretrain_optimizer the CNN and object heads in shapes pretraining: Adam, cosine decay
  scst_optimizer     the language model in self-critical training: Adam at its own
                     constant learning rate, the same clipping
  ranking_optimizer  the alignment model (config.model.kind="ranking"): Adam with the
                     gradient's global norm clipped, weight decay, the LM's schedule
"""

import jax.numpy as jnp
import optax


def decay_factor(config, step):
  """The learning-rate factor at caption step `step` (0-based), by config.learning_rate_schedule.

  "neuraltalk2": NeuralTalk2's 0.5 ** ((step - start) / every) after the decay
  start, smoothly (x1 at the start, x0.5 `every` steps later). "step": x0.5 at
  the start and again every `every` steps (x0.5 at the start, x0.25 `every`
  steps later). A decay start of -1 keeps the rate constant.
  """
  start, every = config.learning_rate_decay_start, config.learning_rate_decay_every
  if start < 0:
    return jnp.ones_like(step, jnp.float32)
  kind = config.get("learning_rate_schedule", "step")
  if kind == "neuraltalk2":
    return jnp.where(step > start, 0.5 ** ((step - start) / every), 1.0).astype(jnp.float32)
  if kind == "step":
    return 0.5 ** jnp.maximum(0, (step - start) // every + 1) * (step >= start) + 1.0 * (step < start)
  raise ValueError(f"config.learning_rate_schedule={kind!r}: one of 'step', 'neuraltalk2'")


def lm_optimizer(config):
  """(tx, schedule): Adam with NeuralTalk2's settings: element-wise clipping, decay."""
  decay_factor(config, jnp.int32(0))  # a bad schedule name fails here, not in the jitted step
  schedule = lambda step: config.learning_rate * decay_factor(config, step)
  tx = optax.chain(
      optax.clip(config.grad_clip),
      optax.scale_by_adam(b1=config.beta1, b2=config.beta2, eps=config.epsilon),
      optax.scale_by_schedule(lambda s: -schedule(s)))
  return tx, schedule


def ranking_optimizer(config):
  """(tx, schedule): Adam on the alignment model, with the language model's learning
  rate schedule, the gradient's global norm clipped and L2 weight decay (the paper's
  regularization)."""
  _, schedule = lm_optimizer(config)
  tx = optax.chain(
      optax.clip_by_global_norm(config.ranking_clip_norm),
      optax.add_decayed_weights(config.ranking_weight_decay),
      optax.scale_by_adam(b1=config.beta1, b2=config.beta2, eps=config.epsilon),
      optax.scale_by_schedule(lambda s: -schedule(s)))
  return tx, schedule


def cnn_optimizer(config):
  """Adam for the CNN while fine-tuned; with the "neuraltalk2" schedule its rate
  decays as the LM's does, counted in caption steps (the CNN starts at
  `finetune_cnn_after`)."""
  if config.get("learning_rate_schedule", "step") != "neuraltalk2":
    return optax.chain(
        optax.clip(config.grad_clip),
        optax.add_decayed_weights(config.cnn_weight_decay),
        optax.adam(config.cnn_learning_rate, b1=config.cnn_beta1, b2=config.cnn_beta2,
                   eps=config.epsilon))
  offset = max(config.finetune_cnn_after, 0)
  schedule = lambda count: config.cnn_learning_rate * decay_factor(config, count + offset)
  return optax.chain(
      optax.clip(config.grad_clip),
      optax.add_decayed_weights(config.cnn_weight_decay),
      optax.adam(schedule, b1=config.cnn_beta1, b2=config.cnn_beta2, eps=config.epsilon))


def pretrain_optimizer(config):
  steps = max(config.cnn_pretrain_steps, 1)
  return optax.adam(optax.cosine_decay_schedule(config.cnn_pretrain_learning_rate, steps, 0.02))


def scst_optimizer(config):
  """Adam at config.scst_learning_rate (constant, as the reference implementations)."""
  return optax.chain(
      optax.clip(config.grad_clip),
      optax.adam(config.scst_learning_rate, b1=config.beta1, b2=config.beta2,
                 eps=config.epsilon))


class TrainStates:
  """The optimizers of a run and the fresh train state of each phase.

  A train state is {"step", "params", "batch_stats", "opt_state"}; `caption`
  serves the alignment model too (a ranking config: its parameters and
  optimizer in place of the language model's). `heads` are
  the pretraining phase's object heads (linear on the CNN's own per-cell fc
  layer when it has one, else behind a hidden layer).
  """

  def __init__(self, config, params, batch_stats, feat_dim: int, heads_rng):
    from captionjax.models import build  # pylint: disable=g-import-not-at-top
    self.params, self.batch_stats = params, batch_stats
    self.feat_dim, self.heads_rng = feat_dim, heads_rng
    self.tx_pre = pretrain_optimizer(config)
    ranker = build.model_kind(config) == "ranking"
    self.tx_lm, self.lr_schedule = (ranking_optimizer if ranker else lm_optimizer)(config)
    self.tx_cnn = cnn_optimizer(config)
    # The CNN's Adam state (two copies of its parameters) exists only where it is fine-tuned.
    self.finetune = config.finetune_cnn_after >= 0 and not config.cached_features
    self.tx_scst = scst_optimizer(config) if config.get("scst_steps", 0) else None
    self.lm_keys = build.head_keys(config)
    kw = config.model.cnn_kwargs
    self.heads = build.object_heads(kw.get("grid", 1), 0 if kw.get("cell_fc", 0) else 256)

  def pretrain(self) -> dict:
    """The CNN (as initialized) and fresh heads, for object pretraining."""
    hp = self.heads.init(self.heads_rng, jnp.zeros((1, self.feat_dim)))["params"]
    p = {"cnn": self.params["cnn"], "heads": hp}
    return {"step": jnp.int32(0), "params": p, "batch_stats": self.batch_stats,
            "opt_state": self.tx_pre.init(p)}

  def restore(self, ckpt, step: int, state, caption_phase: bool) -> dict:
    """Checkpoint `step` shaped as `state` (captionjax/checkpoints.py).

    A caption checkpoint may differ from this run in the CNN's Adam state: one
    saved with the CNN frozen has none where this run fine-tunes it (it gets a
    fresh one), and one saved before frozen CNNs lost theirs has one where
    this run keeps the CNN frozen.
    """
    from captionjax import checkpoints  # pylint: disable=g-import-not-at-top
    if not caption_phase:
      return checkpoints.restore_state(ckpt, step, state)
    fine_tunes = "cnn" in state["opt_state"]
    other = self.caption(state["params"], state["batch_stats"], 0, not fine_tunes)
    state = checkpoints.restore_state(ckpt, step, state, other)
    if fine_tunes and "cnn" not in state["opt_state"]:
      state["opt_state"] = {**state["opt_state"], "cnn": self.tx_cnn.init(state["params"]["cnn"])}
    return state

  def caption(self, params, batch_stats, step: int, cnn_opt=None) -> dict:
    """The captioner's parameters with fresh optimizer states: the LM's, and
    the CNN's when it will be fine-tuned (or `cnn_opt` says so)."""
    opt = {"lm": self.tx_lm.init({k: params[k] for k in self.lm_keys})}
    if self.finetune if cnn_opt is None else cnn_opt:
      opt["cnn"] = self.tx_cnn.init(params["cnn"])
    return {"step": jnp.int32(step), "params": params, "batch_stats": batch_stats,
            "opt_state": opt}

  def scst(self, params, batch_stats, step: int) -> dict:
    """The captioner's parameters with fresh self-critical (LM) and, where the
    CNN is fine-tuned, CNN optimizer states."""
    opt = {"lm": self.tx_scst.init({k: params[k] for k in self.lm_keys})}
    if self.finetune:
      opt["cnn"] = self.tx_cnn.init(params["cnn"])
    return {"step": jnp.int32(step), "params": params, "batch_stats": batch_stats,
            "opt_state": opt}
