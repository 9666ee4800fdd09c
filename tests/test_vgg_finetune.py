"""CNN fine-tuning and cached features: which parameters move and when, the
frozen CNN's missing backward pass, cached equals online features, and
training from imported weights (that one is marked slow: `-m slow`).

A tiny SmallVGG (widths 8, 16, 32) on the tiny shapes set keeps every step
at milliseconds; the schedule test runs the real `train_and_evaluate`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from captionjax import checkpoints
from captionjax import input_pipeline
from captionjax import evaluation
from captionjax import optim
from captionjax import steps
from captionjax import trainer
from captionjax.models import build as build_lib
from captionjax import vocab as vocab_lib
from captionjax import weights
from captionjax.models.vgg import VGG16
from conftest import tiny_config

# Compared with references: full float32 matmuls on any backend (conftest).
pytestmark = pytest.mark.usefixtures("highest_matmul_precision")

SEQ = 5


def build(config, data):
  """(cnn, lm, state) for caption training, as train_and_evaluate builds them."""
  cnn, lm, _ = build_lib.make_models(config, vocab_size=data.vocab_size)
  size = data.images.shape[1]
  cnn_vars = cnn.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  dim = jax.eval_shape(lambda v: cnn.apply(v, jnp.zeros((1, size, size, 3))), cnn_vars).shape[-1]
  lm_vars = lm.init(jax.random.key(1), jnp.zeros((1, dim)),
                    jnp.zeros((1, 1, data.max_length + 2), jnp.int32))
  params = {"cnn": cnn_vars["params"], **lm_vars["params"]}
  tx_lm, _ = optim.lm_optimizer(config)
  tx_cnn = optim.cnn_optimizer(config)
  state = {"step": jnp.int32(0), "params": params, "batch_stats": cnn_vars["batch_stats"],
           "opt_state": {"lm": tx_lm.init({k: params[k] for k in ("img_embed", "lm")}),
                         "cnn": tx_cnn.init(params["cnn"])}}
  return cnn, lm, tx_lm, tx_cnn, state


@pytest.fixture(scope="module")
def setup(shapes_dir):
  """(config, data, batches, model): three training batches of 8 images and
  the models, state and steps, each mode's step compiled once for the module."""
  config = tiny_config(shapes_dir, cnn_weight_decay=1e-4)
  data = input_pipeline.load_split(shapes_dir, "train")
  data.vocab_size = len(vocab_lib.Vocabulary.load(shapes_dir))
  batches = []
  it = input_pipeline.TrainIterator(data, 8, seq_per_img=SEQ, seed=0)
  for _ in range(3):
    b = next(it)
    batches.append({"image": b["image"], "captions": b["captions"], "mask": b["mask"],
                    "row": b["row"]})
  cnn, lm, tx_lm, tx_cnn, state = build(config, data)
  size = data.images.shape[1]
  dim = jax.eval_shape(lambda p, bs, x: cnn.apply(build_lib.cnn_variables(p, bs), x),
                       state["params"]["cnn"], state["batch_stats"],
                       jnp.zeros((1, size, size, 3))).shape[-1]  # D of the CNN's features
  compiled = {}
  for mode in MODES:
    b = strip(dict(batches[0], features=np.zeros((8, dim), np.float32)), mode)
    step = steps.make_caption_step(cnn, lm, tx_lm, tx_cnn, mode)
    compiled[mode] = jax.jit(step).lower(state, b, jax.random.key(0)).compile()
  return config, data, batches, {"cnn": cnn, "state": state, "steps": compiled}


MODES = ("features", "frozen", "finetune")


def moved(a, b) -> dict:
  """Top-level parameter group -> whether any of its leaves changed."""
  return {k: any(not np.array_equal(x, y) for x, y in
                 zip(jax.tree_util.tree_leaves(a[k]), jax.tree_util.tree_leaves(b[k])))
          for k in a}


def strip(batch, mode):
  keep = ("captions", "mask", "features" if mode == "features" else "image")
  return {k: v for k, v in batch.items() if k in keep}


@pytest.mark.parametrize("mode,cnn_moves", [("frozen", False), ("finetune", True)])
def test_which_parameters_move(setup, mode, cnn_moves):
  config, _, batches, model = setup
  state = model["state"]
  before = jax.device_get(state["params"])
  stats_before = jax.device_get(state["batch_stats"])
  for b in batches[:2]:
    state, metrics = model["steps"][mode](state, strip(b, mode), jax.random.key(0))
  assert np.isfinite(float(metrics["loss_sum"]))
  after = jax.device_get(state["params"])
  assert moved(before, after) == {"cnn": cnn_moves, "img_embed": True, "lm": True}
  # BatchNorm statistics only update while the CNN trains.
  assert moved({"s": stats_before}, {"s": jax.device_get(state["batch_stats"])})["s"] == cnn_moves
  if cnn_moves:  # the CNN's own optimizer: Adam at cnn_learning_rate moves each weight < ~lr
    first = jax.tree_util.tree_leaves(before["cnn"])[0]
    delta = np.abs(jax.tree_util.tree_leaves(after["cnn"])[0] - first).max()
    assert 0 < delta <= 3 * config.cnn_learning_rate * (1 + 1e-3)


def count_convolutions(compiled_text: str) -> int:
  return sum(1 for line in compiled_text.splitlines()
             if " convolution(" in line or "custom-call" in line and "conv" in line.lower())


def test_no_backward_pass_through_a_frozen_cnn(setup):
  """In the compiled step, a frozen CNN has only its forward convolutions."""
  config, _, _, model = setup
  n_conv = len(config.model.cnn_kwargs.widths) * 2  # convs_per_block = 2
  counts = {mode: count_convolutions(model["steps"][mode].as_text()) for mode in MODES}
  # features: no CNN at all; frozen: the forward only; fine-tuning: forward,
  # weight gradients and input gradients (all but the first layer's).
  assert counts == {"features": 0, "frozen": n_conv, "finetune": 3 * n_conv - 1}, counts


def test_cached_features_equal_online_features(setup):
  _, data, batches, model = setup
  state = model["state"]
  feats = evaluation.compute_features(model["cnn"], state["params"]["cnn"], state["batch_stats"],
                                 {"train": data}, 10, jnp.asarray)["train"]
  assert feats.shape[0] == len(data)
  s_online, s_cached = state, state
  rng = jax.random.key(3)
  for b in batches:
    s_online, m_online = model["steps"]["frozen"](s_online, strip(b, "frozen"), rng)
    s_cached, m_cached = model["steps"]["features"](
        s_cached, strip(dict(b, features=feats[b["row"]]), "features"), rng)
    np.testing.assert_allclose(m_cached["loss_sum"], m_online["loss_sum"], rtol=1e-5)
  for a, c in zip(jax.tree_util.tree_leaves(jax.device_get(s_online["params"])),
                  jax.tree_util.tree_leaves(jax.device_get(s_cached["params"]))):
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)
  # And the parameters did move (the comparison is not of two untouched states).
  assert moved(jax.device_get(state["params"]), jax.device_get(s_cached["params"]))["lm"]


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
  """A shapes set of 16 training and 4 test images, no validation split:
  end-to-end runs here cost their compilations and little else."""
  from captionjax import shapes  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp("mini"))
  return shapes.prepare(root, {"train": 16, "test": 4}, image_size=64, seed=1, num_workers=1)


def restore_params(workdir, step):
  ckpt = checkpoints.Checkpointer(workdir, 10)
  state = ckpt.restore(step, None)  # as saved
  ckpt.close()
  return jax.device_get(state["params"])


def test_finetune_cnn_after_schedule(mini_dir, tmp_path):
  """finetune_cnn_after=2: the CNN is still after caption steps 1 and 2, moves at 3 and 4."""
  config = tiny_config(mini_dir, cnn_pretrain_steps=0, num_train_steps=4, cached_features=False,
                       finetune_cnn_after=2, checkpoint_every_steps=1, keep_checkpoints=10,
                       eval_every_steps=100, log_every_steps=1, eval_batch_size=4)
  config.extra_test_splits = ()
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir, progress=False)
  p = {s: restore_params(workdir, s) for s in (1, 2, 3, 4)}
  assert [moved(p[s - 1], p[s])["cnn"] for s in (2, 3, 4)] == [False, True, True]
  assert all(moved(p[s - 1], p[s])["lm"] for s in (2, 3, 4))


def test_cnn_weights_config_errors(shapes_dir, tmp_path):
  config = tiny_config(shapes_dir, model__attention=False)  # VGG16: no grid cells
  config.model.cnn_weights = str(tmp_path)
  with pytest.raises(ValueError, match="cnn='vgg16'"):
    build_lib.make_models(config, 10)
  config.model.cnn = "vgg16"
  config.model.cnn_kwargs = {"output": "fc7"}
  with pytest.raises(weights.WeightsError, match="weights.json"):
    build_lib.make_models(config, 10)
  # The model takes the normalization the weights record (weights.json only is read).
  weights.save({}, str(tmp_path), source="w.h5", source_format="keras_h5")
  cnn, _, full = build_lib.make_models(config, 10)
  assert cnn.preprocess == "caffe" and full.cnn_kwargs["preprocess"] == "caffe"
  config.model.cnn_kwargs = {"output": "fc7", "preprocess": "torch"}  # set in the config: kept
  cnn = build_lib.make_models(config, 10)[0]
  assert cnn.preprocess == "torch"
  with pytest.raises(weights.WeightsError, match="expect preprocess='caffe'.*'torch'"):
    weights.load_params(str(tmp_path), {}, cnn.preprocess)  # as training starts


@pytest.mark.slow  # about 30 s of CPU (VGG16 on 20 images, compilations); -m slow
def test_training_starts_from_imported_weights(mini_dir, tmp_path):
  """A VGG16 for the 64 px shapes set (fc1 takes a 2x2 map), imported as
  torchvision weights: training starts from them, with their normalization."""
  rng = np.random.default_rng(0)
  like = jax.eval_shape(VGG16(output="fc7").init, jax.random.key(0),
                        jnp.zeros((1, 64, 64, 3)))["params"]
  # Small random weights (a real file would be ImageNet's).
  params = jax.tree_util.tree_map(
      lambda x: (0.02 * rng.standard_normal(x.shape)).astype(np.float32), like)
  wdir = str(tmp_path / "weights")
  weights.save(params, wdir, source="random.safetensors", source_format="torch")
  config = tiny_config(mini_dir, cnn_pretrain_steps=0, num_train_steps=1, eval_every_steps=100,
                       checkpoint_every_steps=1, eval_batch_size=4)
  config.model.cnn = "vgg16"
  config.model.cnn_kwargs = {"output": "fc7"}
  config.model.attention = False  # one fc7 vector per image, as NeuralTalk2
  config.model.cnn_weights = wdir
  config.extra_test_splits = ()
  cnn, _, _ = build_lib.make_models(config, 10)
  assert cnn.preprocess == "torch"
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir, progress=False)
  got = restore_params(workdir, 1)["cnn"]
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)  # cached features: the CNN starts and stays imported
  assert os.path.exists(os.path.join(workdir, "scores.json"))
