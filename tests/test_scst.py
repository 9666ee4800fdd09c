"""Self-critical sequence training: the reward, the baselines, the policy
gradient, the three CNN modes, a tiny run that learns, and the phase in
`captionjax train` (logs, checkpoints, exact resume).
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_args, tiny_config


def _setup(shapes_dir, **overrides):
  """(config, vocab, train data, cnn, lm, params, batch_stats, feat_dim) of the tiny recipe."""
  from captionjax import input_pipeline
  from captionjax import vocab as vocab_lib
  from captionjax.models import build
  config = tiny_config(shapes_dir, **overrides)
  vocab = vocab_lib.Vocabulary.load(shapes_dir)
  data = input_pipeline.load_split(shapes_dir, "train")
  cnn, lm, _ = build.make_models(config, len(vocab))
  params, batch_stats, feat_dim = build.init_params(
      config, cnn, lm, data.image_size, data.max_length, jax.random.PRNGKey(0),
      jax.random.PRNGKey(1))
  return config, vocab, data, cnn, lm, params, batch_stats, feat_dim


# ---------------------------------------------------------------- the reward


def test_reward_equals_the_cider_d_scorer_per_sample(shapes_dir):
  """Reward.score on token ids == pycocoevalcap's CIDEr-D of the detokenized
  captions, with every training image's references as its document set."""
  from pycocoevalcap.cider.cider import Cider
  from captionjax import input_pipeline
  from captionjax import scst
  from captionjax import vocab as vocab_lib
  data = input_pipeline.load_split(shapes_dir, "train")
  vocab = vocab_lib.Vocabulary.load(shapes_dir)
  reward = scst.Reward(data, vocab)
  n, t = len(data), data.max_length + 1
  rng = np.random.default_rng(0)
  tokens = np.zeros((n, 4, t), np.int32)  # -> [N, K=4, T]
  for i in range(n):
    own = data.captions[i, 0]
    other = data.captions[(i + 1) % n, 1]
    tokens[i, 0, :own.size] = own  # one of its own references
    tokens[i, 1, :other.size] = other  # another image's
    length = rng.integers(1, t + 1)  # random words, some never ending
    tokens[i, 2, :length] = rng.integers(1, len(vocab) + 1, length)
    cut = rng.integers(1, 8)  # a prefix of its own, then END and garbage after it
    tokens[i, 3, :cut] = own[:cut]
    tokens[i, 3, cut + 1:] = rng.integers(1, len(vocab) + 1, t - cut - 1)
  got = reward.score(np.arange(n), tokens)  # -> [N, 4]

  def words(ids):
    return vocab.decode(ids) or "<nothing>"  # coco-caption needs a word

  gts = {i: [vocab.decode(c) for c in data.captions[i, :data.num_captions[i]]] for i in range(n)}
  for k in range(tokens.shape[1]):
    res = {i: [words(tokens[i, k])] for i in range(n)}
    _, want = Cider().compute_score(gts, res)
    np.testing.assert_allclose(got[:, k], want, rtol=1e-9, atol=1e-12)
  assert (got[:, 0] > got[:, 1]).mean() > 0.9  # its own reference beats another image's


def test_grounding_terms_count_the_absent_shapes_and_exact_captions(shapes_dir):
  """The grounded reward = CIDEr-D - penalty x the shapes named that the image
  lacks + bonus when it names exactly the image's objects (both counted
  independently here), on captions naming 0, 1 and 2 absent shapes and on one
  naming every object of the image."""
  from captionjax import input_pipeline
  from captionjax import scst
  from captionjax import shapes
  from captionjax import vocab as vocab_lib
  data = input_pipeline.load_split(shapes_dir, "train")
  vocab = vocab_lib.Vocabulary.load(shapes_dir)
  plain = scst.Reward(data, vocab)
  penalized, rewarded = scst.Reward(data, vocab, 0.75), scst.Reward(data, vocab, 0.0, 0.5)
  rows = np.arange(12)
  tokens = np.zeros((12, 4, data.max_length + 1), np.int32)
  single = np.array([len(data.objects[r]) == 1 for r in rows])
  assert 0 < single.sum() < 12  # both kinds of image
  for r in rows:
    objs = data.objects[r]
    absent = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES
              if s not in {x["shape"] for x in objs}][:2]
    texts = [f"a {objs[0]['color']} {objs[0]['shape']}", f"a {absent[0][0]} {absent[0][1]}",
             f"a {absent[0][0]} {absent[0][1]} and a {absent[1][0]} {absent[1][1]}",
             " and ".join(f"a {o['color']} {o['shape']}" for o in objs[::-1])]
    for k, text in enumerate(texts):
      ids = [vocab.word_to_ix[w] for w in text.split()]
      tokens[r, k, :len(ids)] = ids
  base = plain.score(rows, tokens)
  np.testing.assert_allclose(penalized.score(rows, tokens) - base,
                             np.broadcast_to([0.0, -0.75, -1.5, 0.0], (12, 4)))
  want = np.zeros((12, 4))
  want[:, 0], want[:, 3] = 0.5 * single, 0.5  # the first object alone is exact when alone
  np.testing.assert_allclose(rewarded.score(rows, tokens) - base, want)


def test_advantages_greedy_and_mean_baselines():
  from captionjax import scst
  rewards = np.random.default_rng(1).random((6, 5)) * 4  # -> [B, K]
  greedy = np.random.default_rng(2).random(6) * 4
  adv, base = scst.advantages(rewards, "greedy", greedy)
  np.testing.assert_array_equal(base, np.repeat(greedy[:, None], 5, 1))
  np.testing.assert_array_equal(adv, rewards - greedy[:, None])
  adv, base = scst.advantages(rewards, "mean")
  for b in range(6):  # each sample's baseline: the mean of the image's other samples
    for k in range(5):
      assert base[b, k] == pytest.approx(np.delete(rewards[b], k).mean(), rel=1e-12)
  np.testing.assert_allclose(adv.mean(1), 0.0, atol=1e-12)  # zero mean over each image's samples
  assert np.abs(adv).max() > 0.1
  with pytest.raises(ValueError, match="scst_samples"):
    scst.advantages(rewards[:, :1], "mean")
  with pytest.raises(ValueError, match="scst_baseline"):
    scst.advantages(rewards, "max")


@pytest.mark.parametrize("config,override,field", [
    ("default", "scst_xe_weight=-0.5", "scst_xe_weight"),
    ("default", "scst_exact_bonus=nan", "scst_exact_bonus"),
    ("default", "scst_baseline=max", "scst_baseline"),
    ("default", "scst_samples=0", "scst_samples"),
    ("ranking", "scst_steps=10", "needs a captioner")])
def test_scst_config_fields_are_checked(config, override, field):
  from captionjax import configs
  with pytest.raises(configs.ConfigError, match=field):
    configs.load_config(config, [override])
  c = configs.load_config("default")  # the default recipe ends with SCST
  assert c.scst_steps > 0 and c.scst_baseline == "mean"
  assert configs.load_config("ranking").scst_steps == 0
  assert configs.load_config("neuraltalk2").scst_steps == 0


# ---------------------------------------------------------------- the policy gradient


def test_recomputed_logprobs_equal_the_samplers(shapes_dir):
  """Teacher-forced log-probabilities of the samples (with gradients) are the
  sampler's own, step by step; samples differ, the greedy caption is greedy."""
  from captionjax import decode
  from captionjax import steps
  from captionjax.models.captioner import Captioner
  config, vocab, data, cnn, lm, params, bs, d = _setup(shapes_dir)
  feats = jax.random.normal(jax.random.PRNGKey(3), (4, d))
  t = data.max_length + 1
  sample = jax.jit(steps.make_scst_sample(cnn, lm, "features", 5, t, greedy=True))
  state = {"step": jnp.int32(7), "params": params, "batch_stats": bs}
  with jax.default_matmul_precision("highest"):
    out = sample(state, {"features": feats}, jax.random.PRNGKey(4))
    lm_params = {k: params[k] for k in ("img_embed", "lm")}
    logp = steps.sample_logprobs(lm, lm_params, feats, out["samples"])
    v = {"params": lm_params}
    carry = lm.apply(v, lm.apply(v, feats, method=Captioner.encode),
                     method=Captioner.decode_start)
    greedy, _ = decode.greedy(lambda c, x: lm.apply(v, c, x, method=Captioner.decode_step),
                              carry, t)
  assert out["samples"].shape == (4, 5, t)
  np.testing.assert_allclose(logp, out["logprobs"], rtol=1e-4, atol=1e-4)
  assert len({tuple(s) for s in np.asarray(out["samples"]).reshape(20, t)}) > 10
  np.testing.assert_array_equal(out["greedy"], greedy)
  mask = np.asarray(steps.sequence_mask(jnp.array([[5, 3, 0, 0], [5, 3, 2, 1], [0, 0, 0, 0]])))
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_policy_gradient_loss_matches_finite_differences(shapes_dir):
  """The gradient of -sum A * log p(sample), in float64, against central
  differences along random directions of the LM's parameters."""
  from captionjax import steps
  config, vocab, data, cnn, lm, params, bs, d = _setup(shapes_dir)
  t = data.max_length + 1
  feats = jax.random.normal(jax.random.PRNGKey(5), (3, d))
  rng = np.random.default_rng(6)  # captions of 1..T tokens, 0 after the END
  samples = rng.integers(1, len(vocab) + 1, (3, 4, t)).astype(np.int32)
  samples[np.arange(t) >= rng.integers(1, t + 2, (3, 4, 1))] = 0
  adv = jax.random.normal(jax.random.PRNGKey(7), (3, 4))
  with jax.enable_x64(True):
    p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64),
                                 {k: params[k] for k in ("img_embed", "lm")})
    f64, a64 = jnp.asarray(feats, jnp.float64), jnp.asarray(adv, jnp.float64)

    @jax.jit
    def loss(p):
      loss_sum, count = steps.scst_loss(lm, p, f64, samples, a64)
      return loss_sum / count

    grad = jax.jit(jax.grad(loss))(p64)
    logp = jax.jit(lambda p: steps.sample_logprobs(lm, p, f64, samples))(p64)
    assert float(loss(p64)) == pytest.approx(float(-(a64 * logp).mean()), rel=1e-12)
    leaves, treedef = jax.tree_util.tree_flatten(p64)
    for seed in range(3):  # unit directions
      keys = jax.random.split(jax.random.PRNGKey(10 + seed), len(leaves))
      v = [jax.random.normal(k, x.shape, jnp.float64) for k, x in zip(keys, leaves)]
      norm = np.sqrt(sum(float(jnp.sum(y * y)) for y in v))
      v = jax.tree_util.tree_unflatten(treedef, [y / norm for y in v])
      eps = 1e-4
      shift = lambda s: jax.tree_util.tree_map(lambda x, y: x + s * eps * y, p64, v)
      numeric = (float(loss(shift(1))) - float(loss(shift(-1)))) / (2 * eps)
      analytic = sum(float(jnp.vdot(g, y)) for g, y in zip(
          jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(v)))
      assert abs(analytic) > 1e-4
      assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-10)


def test_mixed_objective_adds_the_weighted_cross_entropy(shapes_dir):
  """scst_xe_weight=w: with plain SGD (lr 1), the update moves the LM by minus
  the gradient of the policy-gradient loss plus w x the references'
  cross-entropy per word, both computed here from scst_loss and caption_loss
  (no dropout), and the metrics carry that cross-entropy."""
  import optax
  from captionjax import input_pipeline
  from captionjax import steps
  from captionjax.models import build
  config, vocab, data, cnn, lm, params, bs, d = _setup(shapes_dir, model__drop_prob_lm=0.0)
  b = next(input_pipeline.eval_batches(data, 4, 5))
  feats = cnn.apply(build.cnn_variables(params["cnn"], bs), build.images_to_input(b["image"]))
  t = data.max_length + 1
  samples = np.random.default_rng(3).integers(0, len(vocab) + 1, (4, 3, t)).astype(np.int32)
  batch = {"samples": samples, "advantage": jnp.asarray(np.linspace(-1, 1, 12).reshape(4, 3)),
           "features": feats, "captions": b["captions"], "mask": b["mask"]}
  tx = optax.sgd(1.0)
  lm_params = {k: params[k] for k in build.LM_KEYS}
  state = {"step": jnp.int32(0), "params": params, "batch_stats": bs,
           "opt_state": {"lm": tx.init(lm_params)}}

  def parts(p):  # (policy-gradient loss, cross-entropy per word)
    pg_sum, count = steps.scst_loss(lm, p, feats, samples, batch["advantage"])
    xe_sum, xe_count = steps.caption_loss(lm, p, feats, batch, False, None)
    return pg_sum / count, xe_sum / xe_count

  with jax.default_matmul_precision("highest"):
    new, metrics = jax.jit(steps.make_scst_step(cnn, lm, tx, tx, "features", 0.5))(
        state, batch, jax.random.PRNGKey(0))
    (pg, xe), grads, g_xe = jax.jit(lambda p: (
        parts(p), jax.grad(lambda q: parts(q)[0] + 0.5 * parts(q)[1])(p),
        jax.grad(lambda q: parts(q)[1])(p)))(lm_params)
  assert float(metrics["xe_sum"] / metrics["xe_count"]) == pytest.approx(float(xe), rel=1e-5)
  assert float(metrics["loss_sum"] / metrics["count"]) == pytest.approx(float(pg), rel=1e-5)
  moved = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b),
                                 {k: new["params"][k] for k in build.LM_KEYS}, lm_params)
  for m, g in zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(m, -np.asarray(g), rtol=1e-4, atol=1e-6)
  assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(g_xe)) > 1e-3


# ---------------------------------------------------------------- the step


@pytest.mark.parametrize("mode", ["features", "frozen", "finetune"])
def test_one_step_in_each_cnn_mode(shapes_dir, mode):
  """Cached features, the frozen CNN and fine-tuning (with the mixed objective):
  one step moves the LM, and the CNN only when fine-tuned; the metrics are finite."""
  from captionjax import input_pipeline
  from captionjax import optim
  from captionjax import scst
  from captionjax.models import build
  config, vocab, data, cnn, lm, params, bs, d = _setup(
      shapes_dir, scst_steps=1, scst_learning_rate=1e-3, scst_samples=3, scst_baseline="mean",
      cached_features=mode == "features", finetune_cnn_after=0 if mode == "finetune" else -1,
      scst_xe_weight=0.1 if mode == "finetune" else 0.0)
  assert scst.cnn_mode(config) == mode
  states = optim.TrainStates(config, params, bs, d, jax.random.PRNGKey(2))
  state = states.scst(params, bs, 0)
  step = scst.Step(cnn, lm, states, config, mode, data.max_length + 1, scst.Reward(data, vocab),
                   jnp.asarray)
  b = next(input_pipeline.eval_batches(data, 4, 1))
  batch = {"row": b["row"], "captions": b["captions"], "mask": b["mask"]}
  if mode == "features":
    batch["features"] = cnn.apply(build.cnn_variables(params["cnn"], bs),
                                  build.images_to_input(b["image"]))
  else:
    batch["image"] = b["image"]
  before = jax.tree_util.tree_map(np.array, params)
  new, metrics = step(state, batch, jax.random.PRNGKey(0))
  assert float(metrics["count"]) == 12  # 4 images x 3 samples
  for k in ("loss_sum", "reward_sum", "baseline_sum", "advantage_sum", "sample_length_sum"):
    assert np.isfinite(float(metrics[k])), k
  assert ("xe_sum" in metrics) == (mode == "finetune")
  if mode == "finetune":  # 4 images x 1 caption of at least 2 words + END
    assert float(metrics["xe_count"]) >= 12 and float(metrics["xe_sum"]) > 0
  assert float(metrics["advantage_sum"]) == pytest.approx(0.0, abs=1e-9)  # mean baseline
  moved = lambda k: any(not np.array_equal(a, np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(before[k]), jax.tree_util.tree_leaves(new["params"][k])))
  assert moved("lm") and moved("img_embed")
  assert moved("cnn") == (mode == "finetune")
  assert int(new["step"]) == 1


def test_scst_raises_the_expected_reward(shapes_dir):
  """A tiny run: a few cross-entropy steps on 16 images, then SCST. What SCST
  maximizes, the expected CIDEr-D of a sampled caption against the image's
  training references (estimated from 50 samples per image with a fixed key),
  goes up, and so do the rewards of the samples it trains on."""
  from captionjax import input_pipeline
  from captionjax import optim
  from captionjax import scst
  from captionjax import steps
  from captionjax.models import build
  config, vocab, data, cnn, lm, params, bs, d = _setup(
      shapes_dir, scst_steps=1, scst_learning_rate=1e-3, scst_samples=5, learning_rate=1e-2,
      learning_rate_decay_start=-1, model__drop_prob_lm=0.0)
  b = next(input_pipeline.eval_batches(data, 16, 5))
  feats = cnn.apply(build.cnn_variables(params["cnn"], bs), build.images_to_input(b["image"]))
  states = optim.TrainStates(config, params, bs, d, jax.random.PRNGKey(2))
  xe = jax.jit(steps.make_caption_step(cnn, lm, states.tx_lm, states.tx_cnn, "features"))
  state = states.caption(params, bs, 0)
  xe_batch = {"captions": b["captions"], "mask": b["mask"], "features": feats}
  for _ in range(40):
    state, _ = xe(state, xe_batch, jax.random.PRNGKey(0))
  reward = scst.Reward(data, vocab)
  sampler = jax.jit(steps.make_scst_sample(cnn, lm, "features", 50, data.max_length + 1, False))

  def expected_reward(s):
    samples = sampler(dict(s, step=jnp.int32(0)), {"features": feats}, jax.random.PRNGKey(7))
    return float(reward.score(b["row"], np.asarray(samples["samples"])).mean())

  start = expected_reward(state)
  step = scst.Step(cnn, lm, states, config, "features", data.max_length + 1, reward, jnp.asarray)
  state = states.scst(state["params"], state["batch_stats"], 40)
  rewards = []
  for _ in range(80):
    state, m = step(state, {"row": b["row"], "features": feats}, jax.random.PRNGKey(1))
    rewards.append(float(m["reward_sum"] / m["count"]))
  end = expected_reward(state)
  assert end > start + 0.05, (start, end)
  assert np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.03, rewards


# ---------------------------------------------------------------- the divergence guard


def test_divergence_guard_on_the_reward(tmp_path):
  """SCST's loss is near zero and of either sign: the guard watches the mean
  reward (below 1/20 of the first: diverged) and a NaN/Inf loss."""
  from captionjax import monitor
  logger = monitor.Logger(str(tmp_path))
  lr = lambda _: 1e-5

  def metrics(reward, loss=-0.3):
    return {"loss_sum": np.float32(loss * 10), "count": np.float32(10),
            "reward_sum": np.float64(reward * 10), "reward_ms_total": 2.0}

  first = {}
  log = monitor.StepLog(logger, "scst", 4, lr, first, 20.0, guard="reward")
  log.add(0, {}, metrics(3.0, loss=0.01), 0.0)
  assert first == {"scst": 3.0}
  log.add(1, {}, metrics(2.0, loss=5.0), 0.0)  # a loss 500x the first is fine here
  rec = log.flush(2, 2)
  assert rec["reward"] == pytest.approx(2.5) and rec["reward_ms"] == pytest.approx(2.0)
  log.add(2, {}, metrics(0.1), 0.0)
  with pytest.raises(monitor.Diverged, match="mean reward 0.1 is below 1/20"):
    log.flush(3, 3)
  log.add(3, {}, metrics(3.0, loss=float("nan")), 0.0)
  with pytest.raises(monitor.Diverged, match="loss is nan"):
    log.check(4)
  logger.close()


# ---------------------------------------------------------------- the phase in `captionjax train`


def _read_log(workdir):
  with open(os.path.join(workdir, "train_log.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _train(workdir, shapes_dir, start_from, **overrides):
  from captionjax import cli
  args = tiny_args(shapes_dir, extra_test_splits=(), cnn_pretrain_steps=0, num_train_steps=0,
                   scst_learning_rate=1e-3, log_every_steps=1, checkpoint_every_steps=2,
                   eval_every_steps=1000, **overrides)
  return cli.main(["train", f"--workdir={workdir}", "--no_progress",
                   f"--start_from={start_from}", *args])


def test_train_runs_the_phase_logs_it_and_resumes_exactly(tmp_path, shapes_dir,
                                                          trained_workdir):
  """`captionjax train --config.scst_steps=4` from a trained run: the log has
  the reward, baseline, advantage, sample length and reward time; checkpoints
  are of the "scst" phase; each jitted part compiles once; a run stopped at
  step 2 and resumed ends exactly as the uninterrupted one."""
  from captionjax import checkpoints
  compiles = []

  class Compiles(logging.Handler):
    def emit(self, record):
      if record.getMessage().startswith("Compiling "):
        compiles.append(record.getMessage().split()[1])

  handler, jax_logger = Compiles(), logging.getLogger("jax")
  jax_logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      assert _train(tmp_path / "a", shapes_dir, trained_workdir, scst_steps=4) == 0
  finally:
    jax_logger.removeHandler(handler)
  assert compiles.count("jit(scst_sample)") == 1 and compiles.count("jit(scst_train_step)") == 1
  log = _read_log(tmp_path / "a")
  steps = [r for r in log if r.get("phase") == "scst" and "loss" in r]
  assert [r["step"] for r in steps] == [1, 2, 3, 4]
  for r in steps:
    for k in ("reward", "baseline", "advantage", "sample_length", "reward_ms", "images_per_s"):
      assert np.isfinite(r[k]), (k, r)
    assert r["advantage"] == pytest.approx(r["reward"] - r["baseline"], abs=1e-9)
    assert 0 < r["sample_length"] <= 17 and r["learning_rate"] == 1e-3
  assert any(r.get("phase") == "val" and r["step"] == 4 for r in log)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "a"), keep=10**6)
  meta = ckpt.restore_meta(ckpt.latest_step())
  ckpt.close()
  assert meta["phase"] == "scst" and meta["step"] == 4
  assert meta["first_loss"]["scst"] == pytest.approx(steps[0]["reward"])

  assert _train(tmp_path / "b", shapes_dir, trained_workdir, scst_steps=2) == 0
  assert _train(tmp_path / "b", shapes_dir, trained_workdir, scst_steps=4) == 0
  resumed = [r for r in _read_log(tmp_path / "b") if r.get("phase") == "scst" and "loss" in r]
  assert [r["step"] for r in resumed] == [1, 2, 3, 4]
  for a, b in zip(steps, resumed):
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["reward"] == pytest.approx(a["reward"], rel=1e-9)
  caps = lambda w: [c["caption"] for c in json.load(open(w / "captions.json", encoding="utf-8"))]
  assert caps(tmp_path / "b") == caps(tmp_path / "a")
