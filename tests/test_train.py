"""Training tests in NeuralTalk2's spirit, and what `captionjax train` writes.

Most use `trained_workdir` (conftest): one tiny run of `captionjax train`,
shared by the whole session.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config


def _read_log(workdir):
  with open(os.path.join(workdir, "train_log.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _caption_batch(shapes_dir, n_images, seq_per_img):
  from captionjax import input_pipeline
  data = input_pipeline.load_split(shapes_dir, "train")
  batch = next(input_pipeline.eval_batches(data, n_images, seq_per_img))
  return {"captions": batch["captions"], "mask": batch["mask"]}, data


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("attention", [True, False])
def test_first_loss_is_log_vocabulary(shapes_dir, attention):
  """An untrained LSTM predicts nearly uniformly: loss ~ log(V + 1) (NeuralTalk2's check)."""
  from captionjax import steps
  from captionjax import vocab as vocab_lib
  from captionjax.models import build
  config = tiny_config(shapes_dir, model__attention=attention)
  vocab = vocab_lib.Vocabulary.load(shapes_dir)
  _, lm, _ = build.make_models(config, len(vocab))
  batch, _ = _caption_batch(shapes_dir, 8, 5)
  feats = jax.random.normal(jax.random.PRNGKey(1), (8, 9 * 8))  # 3 x 3 cells of 8
  params = lm.init(jax.random.PRNGKey(0), feats, jnp.asarray(batch["captions"]))["params"]
  loss_sum, count = steps.caption_loss(lm, params, feats, batch, False, None)
  loss = float(loss_sum / count)
  expected = math.log(len(vocab) + 1)
  assert abs(loss - expected) < 0.05 * expected, (loss, expected)


def test_first_logged_loss_of_the_run_is_log_vocabulary(trained_workdir):
  """The run's own first caption loss (kept in the checkpoint for the divergence guard)."""
  from captionjax import checkpoints
  from captionjax import vocab as vocab_lib
  ckpt = checkpoints.Checkpointer(trained_workdir, keep=10**6)
  meta = ckpt.restore_meta(ckpt.latest_step())
  ckpt.close()
  v = len(vocab_lib.Vocabulary.load(os.path.join(trained_workdir, "vocab.json")))
  first = meta["first_loss"]["caption"]
  assert abs(first - math.log(v + 1)) < 0.05 * math.log(v + 1), (first, v)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_overfits_a_handful_of_captions(shapes_dir, dtype):
  """Five images with one caption each are memorized: the loss goes to nearly zero
  (also with config.dtype="bfloat16": mixed precision)."""
  from captionjax import optim
  from captionjax import steps
  from captionjax import vocab as vocab_lib
  from captionjax.models import build
  config = tiny_config(shapes_dir, model__drop_prob_lm=0.0, learning_rate=1e-2,
                       learning_rate_decay_start=-1, dtype=dtype)
  vocab = vocab_lib.Vocabulary.load(shapes_dir)
  cnn, lm, _ = build.make_models(config, len(vocab))
  batch, _ = _caption_batch(shapes_dir, 5, 1)
  batch["features"] = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (5, 9 * 8)))
  tx_lm, _ = optim.lm_optimizer(config)
  tx_cnn = optim.cnn_optimizer(config)
  params = dict(lm.init(jax.random.PRNGKey(0), batch["features"],
                        jnp.asarray(batch["captions"]))["params"], cnn={})
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  lm_part = {k: params[k] for k in ("img_embed", "lm")}
  state = {"step": jnp.int32(0), "params": params, "batch_stats": {},
           "opt_state": {"lm": tx_lm.init(lm_part), "cnn": tx_cnn.init({})}}
  step = jax.jit(steps.make_caption_step(cnn, lm, tx_lm, tx_cnn, "features"))
  losses = []
  for _ in range(300):
    state, m = step(state, batch, jax.random.PRNGKey(3))
    losses.append(float(m["loss_sum"] / m["count"]))
  assert losses[0] > 2.0, losses[0]
  assert losses[-1] < 0.05, losses[-10:]


# ---------------------------------------------------------------- checkpoints


def _random_state(seed=0):
  import optax
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"lm": {"w": jax.random.normal(k[0], (7, 5)), "b": jnp.zeros((5,))},
            "cnn": {"conv": jax.random.normal(k[1], (3, 3, 3, 4), jnp.bfloat16)}}
  tx = optax.adam(1e-3)
  opt = tx.init(params)
  grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * 0.1, params)
  _, opt = tx.update(grads, opt, params)  # non-trivial moments and count
  return {"step": jnp.int32(1234), "params": params, "batch_stats": {"bn": {"mean": jnp.arange(4.0)}},
          "opt_state": opt}


def test_checkpoint_restores_an_identical_state(tmp_path):
  from captionjax import checkpoints
  state = _random_state()
  meta = {"step": 1234, "phase": "caption", "data_position": 9872, "rng": [0, 42],
          "first_loss": {"caption": 3.5}}
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1234, state, meta)
  ckpt.close()
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2)  # a new process would do this
  assert ckpt.latest_step() == 1234
  target = jax.tree_util.tree_map(jnp.zeros_like, state)
  restored = ckpt.restore(1234, target)
  assert ckpt.restore_meta(1234) == meta
  ckpt.close()
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_retention_keeps_latest_and_best(tmp_path):
  """keep=2 plus the best by validation score; the score file survives restarts."""
  from captionjax import checkpoints
  state = {"x": jnp.arange(3.0)}
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2)
  scores = {2: 0.9, 4: 0.5, 6: 0.7}
  for s in range(1, 8):
    ckpt.save(s, state, {"step": s})
    if s in scores:
      ckpt.record_score(s, scores[s], "val_CIDEr")
  ckpt.close()
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2)
  assert ckpt.all_steps() == [2, 6, 7]
  assert ckpt.best_step() == 2
  ckpt.close()


def test_incompatible_checkpoint_is_refused():
  from captionjax import checkpoints
  from captionjax import configs
  from captionjax import vocab as vocab_lib
  config = configs.load_config("default")
  vocab = vocab_lib.Vocabulary(["a", "red", "circle", "UNK"])
  meta = {"vocab_size": 4, "vocab_digest": checkpoints.vocab_digest(vocab.words),
          "config": config.to_dict()}
  changed = configs.load_config("default", ["learning_rate=0.5"])
  assert checkpoints.check_compatible(meta, changed, vocab, "x") == [
      ("learning_rate", config.learning_rate, 0.5)]
  with pytest.raises(checkpoints.CheckpointError, match=r"config.model.rnn_size=256, this config 64"):
    checkpoints.check_compatible(meta, configs.load_config("default", ["model.rnn_size=64"]),
                                 vocab, "x")
  with pytest.raises(checkpoints.CheckpointError, match="vocabulary of 4 words, the data set 3"):
    checkpoints.check_compatible(meta, config, vocab_lib.Vocabulary(["a", "b", "UNK"]), "x")
  with pytest.raises(checkpoints.CheckpointError, match="different vocabulary"):
    checkpoints.check_compatible(meta, config, vocab_lib.Vocabulary(
        ["a", "blue", "circle", "UNK"]), "x")


# ---------------------------------------------------------------- the run


def test_no_recompilation_after_the_first_steps(trained_workdir):
  """Each training step function compiles once; after the first evaluation,
  nothing compiles until training ends (jax.log_compiles)."""
  with open(trained_workdir + ".events.txt", encoding="utf-8") as f:
    events = f.read().split("\n")
  compiles = [e for e in events if e.startswith("compile ")]
  assert compiles.count("compile jit(cnn_pretrain_train_step)") == 1, compiles
  assert compiles.count("compile jit(caption_train_step)") == 1, compiles
  # Pretraining: from its first loss record to its last.
  pre = [i for i, e in enumerate(events) if e.endswith(" cnn_pretrain") and e.startswith("log ")]
  window = events[pre[1]:pre[-1]]  # pre[0] is the compile-time record
  assert len(pre) >= 3 and not [e for e in window if e.startswith("compile")], window
  # Caption phase: from the first validation (which compiles eval and greedy) to the last.
  val = [i for i, e in enumerate(events) if e.endswith(" val")]
  window = events[val[0]:val[-1]]
  steps = [e for e in window if e.endswith(" caption")]
  assert len(val) >= 2 and len(steps) >= 2, events
  assert not [e for e in window if e.startswith("compile")], window


def test_train_writes_logs_tensorboard_captions_and_scores(trained_workdir, shapes_dir):
  log = _read_log(trained_workdir)
  steps = [r for r in log if "loss" in r]
  assert steps, log
  for r in steps:
    for k in ("step", "loss", "learning_rate", "images_per_s"):
      assert isinstance(r[k], (int, float)), (k, r)
    assert math.isfinite(r["loss"]) and r["images_per_s"] > 0
  caption_steps = [r["step"] for r in steps if r["phase"] == "caption"]
  assert caption_steps == [15, 20, 25, 30]
  lrs = [r["learning_rate"] for r in steps if r["phase"] == "caption"]
  assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]  # halved every 5 steps
  assert any("val_CIDEr" in r for r in log)

  caps = json.load(open(os.path.join(trained_workdir, "captions.json"), encoding="utf-8"))
  assert len(caps) == 20  # the tiny test split
  assert len({c["image_id"] for c in caps}) == 20
  for c in caps:
    assert set(c) >= {"image_id", "caption", "file_name", "logprob"}
    assert isinstance(c["caption"], str) and c["logprob"] <= 0
  scores = json.load(open(os.path.join(trained_workdir, "scores.json"), encoding="utf-8"))
  for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
    assert 0 <= scores[k] <= 10, (k, scores.get(k))

  # TensorBoard: the scalars and the sample captions, read back with TensorFlow.
  import tensorflow as tf
  tb = os.path.join(trained_workdir, "tensorboard")
  tags = set()
  for name in os.listdir(tb):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(tb, name)):
      tags.update(v.tag for v in event.summary.value)
  assert {"loss", "learning_rate", "images_per_s", "val_loss"} <= tags, tags
  assert any(t.startswith("val_samples") for t in tags), tags

  # The best checkpoint by validation CIDEr is recorded beside the checkpoints.
  best = json.load(open(os.path.join(trained_workdir, "checkpoints", "best.json"), encoding="utf-8"))
  assert best["metric"] == "val_CIDEr" and sorted(best["scores"]) == ["20", "30"], best

  # PNG plots of the training loss and the validation scores.
  for name in ("loss.png", "val_scores.png"):
    with open(os.path.join(trained_workdir, "plots", name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
