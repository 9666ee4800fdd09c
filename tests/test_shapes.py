"""The embedded shapes data set: determinism, captions, held-out pairs, checks."""

import json
import os

import numpy as np
import pytest

from captionjax import shapes
from captionjax import vocab as vocab_lib


def test_generation_is_deterministic_and_worker_independent(tmp_path):
  splits = {"train": 6, "novel": 3}
  a = shapes.make_shapes(str(tmp_path / "a"), splits, 64, seed=3, progress=False, num_workers=1)
  b = shapes.make_shapes(str(tmp_path / "b"), splits, 64, seed=3, progress=False, num_workers=2)
  c = shapes.make_shapes(str(tmp_path / "c"), splits, 64, seed=4, progress=False, num_workers=1)
  ja, jb, jc = (json.load(open(p)) for p in (a, b, c))
  assert ja == jb and ja != jc
  for item in ja:
    fa = open(os.path.join(tmp_path / "a", item["file_path"]), "rb").read()
    fb = open(os.path.join(tmp_path / "b", item["file_path"]), "rb").read()
    assert fa == fb


def test_scene_statistics():
  rng = np.random.default_rng(0)
  words, pairs, counts = set(), set(), []
  for _ in range(400):
    objs = shapes._sample_objects(rng, novel=False)  # pylint: disable=protected-access
    counts.append(len(objs))
    assert len({(o["row"], o["col"]) for o in objs}) == len(objs)  # distinct cells
    caps = shapes.captions_for(objs, rng)
    assert len(caps) >= 5 and len(set(caps)) >= 3
    for c in caps:
      toks = vocab_lib.tokenize(c)
      assert 1 <= len(toks) <= shapes.MAX_WORDS
      words.update(toks)
      assert shapes.hallucination_free(c, objs), (c, objs)
    pairs.update((o["color"], o["shape"]) for o in objs)
  assert set(counts) == {1, 2, 3}
  assert len(words) >= 40
  assert not pairs & set(shapes.HELD_OUT)
  assert len(pairs) == len(shapes.SHAPES) * len(shapes.COLORS) - len(shapes.HELD_OUT)


def test_novel_split_always_has_a_held_out_pair():
  rng = np.random.default_rng(1)
  for _ in range(100):
    objs = shapes._sample_objects(rng, novel=True)  # pylint: disable=protected-access
    assert {(o["color"], o["shape"]) for o in objs} & set(shapes.HELD_OUT)


def test_render_is_an_image_with_visible_objects():
  rng = np.random.default_rng(0)
  objs = [{"shape": "circle", "color": "yellow", "size": "big", "row": 1, "col": 1}]
  img = shapes.render(objs, 64, rng)
  assert img.shape == (64, 64, 3) and img.dtype == np.uint8
  center = img[26:38, 26:38].astype(float).mean((0, 1))
  assert np.abs(center - shapes.COLORS["yellow"]).max() < 40


@pytest.mark.parametrize("caption,ok", [
    ("a red circle and a blue square", True),
    ("a big red circle", True),
    ("a green circle", False),       # wrong color for the circle
    ("a red star", False),           # no star at all
    ("two shapes a red circle and a square", True),
    ("a blue square to the left of a small red circle", True),
    ("there are red circles", True),
    ("a picture of a triangle", False),
])
def test_hallucination_check(caption, ok):
  objs = [{"shape": "circle", "color": "red", "size": "big", "row": 0, "col": 0},
          {"shape": "square", "color": "blue", "size": "small", "row": 0, "col": 2}]
  assert shapes.hallucination_free(caption, objs) == ok


def test_prepared_set_has_all_splits(shapes_dir):
  info = json.load(open(os.path.join(shapes_dir, "dataset_info.json")))
  assert set(info["splits"]) == {"train", "val", "test", "novel"}
  assert info["vocab_size"] >= 40 and info["skipped"] == []
  assert info["num_captions"] == 5 * sum(info["splits"].values())
