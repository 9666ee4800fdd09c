"""Self-critical sequence training (Rennie et al., 2017): the reward and the step.

One step runs three parts:
  1. jitted (steps.make_scst_sample): K captions sampled per image from the
     model, and its greedy caption (the "greedy" baseline only);
  2. on the host (`Reward`): each caption's CIDEr-D against the image's
     training references, scored on token ids (no detokenizing), with the
     document frequencies of the whole training split, as the reference
     implementations do; the advantage = reward - baseline (`advantages`);
  3. jitted (steps.make_scst_step): the policy-gradient update on the
     samples' log-probabilities, recomputed with gradients.

Baselines: "greedy", the greedy caption's reward (Rennie et al.); "mean", the
mean reward of the other K-1 samples of the image (the "new self-critical"
variant, Luo 2020), whose advantages sum to zero over each image's samples.

Dimensions: N images in the training split, B images per batch, K samples
per image, T decoded tokens (max_length + 1), D CNN feature size.
"""

import time

import numpy as np

from captionjax import decode
from captionjax import parallel
from captionjax import steps
from captionjax.metrics.cider import CiderD

BASELINES = ("greedy", "mean")


class Reward:
  """CIDEr-D of sampled token ids against a split's own (encoded) references.

  The references are the split's captions as the model is trained on them
  (prepro's word ids, rare words as UNK, cut at max_length), keyed by row, so
  the n-grams the reward matches are the ones the model can say. Built once
  (document frequencies over the N images); `score` then takes token arrays.
  """

  def __init__(self, data, vocab, hallucination_penalty: float = 0.0, exact_bonus: float = 0.0):
    """Grounding terms (need the data set's object labels): `hallucination_penalty`
    > 0 takes this much off for each shape a caption names that is not in the
    image; `exact_bonus` > 0 adds this much when it names exactly the image's
    objects (shapes.names_exactly)."""
    for name, value in (("hallucination_penalty", hallucination_penalty),
                        ("exact_bonus", exact_bonus)):
      if value and any(o is None for o in data.objects):
        raise ValueError(f"config.scst_{name} needs object labels (the shapes data set); "
                         "this data set has none")
    self.penalty, self.bonus = hallucination_penalty, exact_bonus
    self.objects, self.vocab = data.objects, vocab
    refs = {}
    for row in range(len(data)):
      caps = [vocab.decode(c) for c in data.captions[row, :int(data.num_captions[row])]]
      refs[row] = [c for c in caps if c] or [""]
    # Index i of the scorer's vocabulary is the model's token id i (0 = END).
    self.scorer = CiderD(refs, vocab=["<end>"] + list(vocab.words))

  def score(self, rows, tokens) -> np.ndarray:
    """float64 [B, K]: CIDEr-D of tokens int [B, K, T] (0 = END) for images `rows` [B],
    less the hallucination penalty, plus the exact-naming bonus."""
    tokens = np.asarray(tokens)
    rewards = self.scorer.score([int(r) for r in rows], tokens)
    if self.penalty or self.bonus:
      from captionjax import shapes  # pylint: disable=g-import-not-at-top
      for (b, k), _ in np.ndenumerate(rewards):
        caption, objects = self.vocab.decode(tokens[b, k]), self.objects[rows[b]]
        rewards[b, k] += (self.bonus * shapes.names_exactly(caption, objects)
                          - self.penalty * shapes.hallucinations(caption, objects))
    return rewards


def advantages(rewards: np.ndarray, baseline: str, greedy_rewards=None):
  """(advantage [B, K], baseline [B, K]) of rewards [B, K].

  "greedy": the baseline is greedy_rewards [B]; "mean": for sample k, the
  mean reward of the image's other K-1 samples.
  """
  b, k = rewards.shape
  if baseline == "greedy":
    base = np.broadcast_to(np.asarray(greedy_rewards, np.float64)[:, None], (b, k))
  elif baseline == "mean":
    if k < 2:
      raise ValueError("config.scst_baseline='mean' needs config.scst_samples >= 2")
    base = (rewards.sum(1, keepdims=True) - rewards) / (k - 1)
  else:
    raise ValueError(f"config.scst_baseline: expected one of {BASELINES}, got {baseline!r}")
  return rewards - base, base


def caption_lengths(tokens: np.ndarray) -> np.ndarray:
  """Words before the first END of each token row [..., T] -> [...]."""
  return np.cumprod(np.asarray(tokens) != decode.END_ID, axis=-1).sum(-1)


class Step:
  """(state, batch, rng) -> (state, metrics): one self-critical step, for trainer.run_phase.

  Not jitted as a whole: it calls the jitted sampler, scores on the host, and
  calls the jitted update (which donates the state). `batch` holds "row" [B]
  and "features" [B, D] or "image" [B, H, W, 3]. The metrics add, to the
  update's loss sums, the sums over samples of the reward, baseline, advantage
  and length, and the host's reward time ("reward_ms_total", summed over steps).
  """

  def __init__(self, cnn, lm, states, config, mode: str, max_length: int, reward: Reward,
               mesh_put):
    import jax  # pylint: disable=g-import-not-at-top
    if config.scst_baseline not in BASELINES:
      raise ValueError(f"config.scst_baseline: expected one of {BASELINES}, "
                       f"got {config.scst_baseline!r}")
    if config.scst_samples < 1 or (config.scst_baseline == "mean" and config.scst_samples < 2):
      raise ValueError(f"config.scst_samples={config.scst_samples}: the {config.scst_baseline!r} "
                       "baseline needs at least " + ("2" if config.scst_baseline == "mean" else "1"))
    self.baseline, self.reward, self.mesh_put, self.mode = (
        config.scst_baseline, reward, mesh_put, mode)
    greedy = self.baseline == "greedy"
    sample = steps.make_scst_sample(cnn, lm, mode, config.scst_samples, max_length, greedy)
    self.xe_weight = float(config.get("scst_xe_weight", 0.0))  # >= 0: configs.validate
    update = steps.make_scst_step(cnn, lm, states.tx_scst, states.tx_cnn,
                                  "finetune" if mode == "finetune" else "features",
                                  self.xe_weight)
    sample.__name__, update.__name__ = "scst_sample", "scst_train_step"  # jax.log_compiles
    self.sample = jax.jit(sample)
    self.update = jax.jit(update, donate_argnums=(0,))

  def __call__(self, state, batch, rng):
    out = self.sample(state, batch, rng)
    samples = parallel.local_rows(out["samples"])  # host sync -> this process's [B, K, T]
    t0 = time.perf_counter()
    rows = parallel.local_rows(batch["row"])
    if self.baseline == "greedy":
      greedy = parallel.local_rows(out["greedy"])[:, None]  # -> [B, 1, T]
      scores = self.reward.score(rows, np.concatenate([samples, greedy], 1))  # -> [B, K+1]
      rewards, adv_base = scores[:, :-1], scores[:, -1]
    else:
      rewards, adv_base = self.reward.score(rows, samples), None
    adv, base = advantages(rewards, self.baseline, adv_base)
    reward_ms = 1e3 * (time.perf_counter() - t0)
    x = {"samples": self.mesh_put(samples),
         "advantage": self.mesh_put(adv.astype(np.float32))}
    x.update({"image": batch["image"]} if self.mode == "finetune"
             else {"features": out["features"]})
    if self.xe_weight:
      x.update(captions=batch["captions"], mask=batch["mask"])
    state, metrics = self.update(state, x, rng)
    sums = parallel.process_sum(np.array([  # over every process's images, the same on each
        rewards.sum(), base.sum(), adv.sum(), caption_lengths(samples).sum()], np.float64))
    return state, {**metrics, **dict(zip(
        ("reward_sum", "baseline_sum", "advantage_sum", "sample_length_sum"), sums)),
                   "reward_ms_total": reward_ms}


def cnn_mode(config) -> str:
  """How SCST sees the images: "features" (cached), "frozen" or "finetune".

  As the caption phase, except that `scst_finetune_cnn=False` keeps a
  fine-tuned CNN frozen (the reference implementations' fixed features).
  """
  if config.cached_features:
    return "features"
  tune = config.finetune_cnn_after >= 0 and config.get("scst_finetune_cnn", True)
  return "finetune" if tune else "frozen"


def phase_parts(r, states, mode: str, features: dict, say=print):
  """(step, batch_fn, validator) of the SCST phase of trainer.Run `r`.

  `features`: split -> cached CNN features (mode "features"), else {}.
  """
  from captionjax import evaluation  # pylint: disable=g-import-not-at-top
  config, t0 = r.config, time.time()
  step = Step(r.cnn, r.lm, states, config, mode, r.info["max_length"] + 1,
              Reward(r.train_data, r.vocab, config.get("scst_hallucination_penalty", 0.0),
                     config.get("scst_exact_bonus", 0.0)),
              r.placement.batch)
  say(f"phase 3: self-critical training, {config.scst_steps} steps ({mode} CNN, "
      f"{config.scst_samples} samples per image, {config.scst_baseline} baseline; the reward's "
      f"references in {time.time() - t0:.1f}s)")
  x = "features" if features else "image"
  refs_kept = ("captions", "mask") if config.get("scst_xe_weight", 0.0) else ()
  batch_fn = lambda b: {"row": b["row"], x: features["train"][b["row"]] if features else b[x],
                        **{k: b[k] for k in refs_kept}}
  refs = evaluation.references(r.data_dir, "val") if r.val_data is not None else None
  validator = evaluation.Validator(
      r.cnn, r.lm, "features" if features else "frozen", r.val_data, refs, r.vocab, config,
      r.info["max_length"], r.placement.everywhere, features.get("val"))
  return step, batch_fn, validator
