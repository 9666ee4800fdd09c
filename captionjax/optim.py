"""The optimizers of the training phases, built from the config.

  lm_optimizer       the language model (and image embedding): Adam with
                     NeuralTalk2's element-wise gradient clipping and its
                     step-halving learning rate
  cnn_optimizer      the CNN while it is fine-tuned: its own Adam and weight decay
  pretrain_optimizer the CNN and object heads in shapes pretraining: Adam, cosine decay
  scst_optimizer     the language model in self-critical training: Adam at its own
                     constant learning rate, the same clipping
"""

import jax.numpy as jnp
import optax


def lm_optimizer(config):
  """(tx, schedule): Adam with NeuralTalk2's settings: element-wise clipping, step halving."""
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
  return optax.chain(
      optax.clip(config.grad_clip),
      optax.add_decayed_weights(config.cnn_weight_decay),
      optax.adam(config.cnn_learning_rate, b1=config.cnn_beta1, b2=config.cnn_beta2,
                 eps=config.epsilon))


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

  A train state is {"step", "params", "batch_stats", "opt_state"}. `heads` are
  the pretraining phase's object heads (linear on the CNN's own per-cell fc
  layer when it has one, else behind a hidden layer).
  """

  def __init__(self, config, params, batch_stats, feat_dim: int, heads_rng):
    from captionjax.models import build  # pylint: disable=g-import-not-at-top
    self.params, self.batch_stats = params, batch_stats
    self.feat_dim, self.heads_rng = feat_dim, heads_rng
    self.tx_pre = pretrain_optimizer(config)
    self.tx_lm, self.lr_schedule = lm_optimizer(config)
    self.tx_cnn = cnn_optimizer(config)
    self.tx_scst = scst_optimizer(config) if config.get("scst_steps", 0) else None
    self.lm_keys = build.LM_KEYS
    kw = config.model.cnn_kwargs
    self.heads = build.object_heads(kw.get("grid", 1), 0 if kw.get("cell_fc", 0) else 256)

  def pretrain(self) -> dict:
    """The CNN (as initialized) and fresh heads, for object pretraining."""
    hp = self.heads.init(self.heads_rng, jnp.zeros((1, self.feat_dim)))["params"]
    p = {"cnn": self.params["cnn"], "heads": hp}
    return {"step": jnp.int32(0), "params": p, "batch_stats": self.batch_stats,
            "opt_state": self.tx_pre.init(p)}

  def caption(self, params, batch_stats, step: int) -> dict:
    """The captioner's parameters with fresh LM and CNN optimizer states."""
    lm_part = {k: params[k] for k in self.lm_keys}
    return {"step": jnp.int32(step), "params": params, "batch_stats": batch_stats,
            "opt_state": {"lm": self.tx_lm.init(lm_part), "cnn": self.tx_cnn.init(params["cnn"])}}

  def scst(self, params, batch_stats, step: int) -> dict:
    """The captioner's parameters with fresh self-critical (LM) and CNN optimizer states."""
    lm_part = {k: params[k] for k in self.lm_keys}
    return {"step": jnp.int32(step), "params": params, "batch_stats": batch_stats,
            "opt_state": {"lm": self.tx_scst.init(lm_part), "cnn": self.tx_cnn.init(params["cnn"])}}
