"""Shared fixtures: small generated data sets, made once per test session."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # pylint: disable=g-import-not-at-top

TINY_SPLITS = {"train": 96, "val": 20, "test": 20, "novel": 10}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A tiny shapes data set, generated and preprocessed (64 px)."""
  from captionjax import shapes
  root = str(tmp_path_factory.mktemp("shapes"))
  return shapes.prepare(root, TINY_SPLITS, image_size=64, seed=0, num_workers=1)


def tiny_config(data_dir: str, **overrides):
  """The default recipe shrunk to seconds on the tiny shapes set."""
  from captionjax import configs
  c = configs.load_config("default")
  c.dataset = data_dir
  c.batch_size = 8
  c.model.cnn_kwargs.widths = (8, 16, 32)
  c.model.input_encoding_size = 32
  c.model.rnn_size = 32
  c.cnn_pretrain_steps = 10
  c.num_train_steps = 20
  c.learning_rate_decay_start = 10
  c.learning_rate_decay_every = 5
  c.eval_every_steps = 10
  c.eval_num_images = 20
  c.eval_batch_size = 10
  c.log_every_steps = 5
  c.checkpoint_every_steps = 10
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, shapes_dir):
  """A workdir with a finished tiny training run (checkpoints, captions, scores)."""
  from captionjax import train
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(tiny_config(shapes_dir), workdir, progress=False)
  return workdir
