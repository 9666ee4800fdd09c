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
