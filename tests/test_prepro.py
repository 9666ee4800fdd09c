"""`captionjax prepro` on NeuralTalk2's raw format: round trip, skips, vocabulary,
and a decoding worker killed by the OS."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import pool_helpers
from captionjax import cli
from captionjax import input_pipeline
from captionjax import prepro
from captionjax import records
from captionjax import vocab as vocab_lib

CAPTIONS = [
    "A dog runs across the grass.",
    "A brown dog is running on a lawn!",
    "Two children play with a red ball.",
    "A man rides a bicycle down the street.",
    "A woman, smiling, holds an umbrella.",
    "The cat sleeps on a sofa.",
]


def _write_images(root, n, size=40):
  rng = np.random.default_rng(0)
  paths = []
  for i in range(n):
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)  # smooth content
    arr = np.asarray(Image.fromarray(small).resize((size, size + i), Image.BILINEAR))
    name = f"img_{i:02d}.jpg" if i % 2 else f"sub/img_{i:02d}.png"
    os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
    Image.fromarray(arr).save(os.path.join(root, name))
    paths.append(name)
  return paths


@pytest.fixture
def raw_set(tmp_path):
  root = tmp_path / "imgs"
  paths = _write_images(str(root), 12)
  # A corrupt image: a truncated JPEG, and a file that is not an image at all.
  good = (root / paths[1]).read_bytes()
  (root / "broken.jpg").write_bytes(good[: len(good) // 3])
  (root / "notes.jpg").write_text("this is not an image")
  items = [{"file_path": p, "captions": [CAPTIONS[i % 6], CAPTIONS[(i + 1) % 6]], "id": 100 + i}
           for i, p in enumerate(paths)]
  items.append({"file_path": "broken.jpg", "captions": ["zebra zebra zebra zebra"], "id": 900})
  items.append({"file_path": "notes.jpg", "captions": ["giraffe"], "id": 901})
  items.append({"file_path": "missing.jpg", "captions": ["nothing"], "id": 902})
  raw = tmp_path / "raw.json"
  raw.write_text(json.dumps(items))
  return str(raw), str(root), items


def _run_prepro(raw, root, out, *extra):
  return cli.main(["prepro", f"--input_json={raw}", f"--images_root={root}",
                   f"--output_dir={out}", "--num_val=2", "--num_test=2", "--max_length=5",
                   "--word_count_threshold=1", "--image_size=32", "--num_workers=1", *extra])


def test_round_trip_with_corrupt_images(raw_set, tmp_path, capsys):
  raw, root, items = raw_set
  out = str(tmp_path / "out")
  assert _run_prepro(raw, root, out) == 0
  err = capsys.readouterr().err
  assert "skipped 3" in err and "broken.jpg" in err and "notes.jpg" in err
  info = records.load_info(out)
  assert info["splits"] == {"train": 8, "val": 2, "test": 2}
  assert sorted(s["file"] for s in info["skipped"]) == ["broken.jpg", "missing.jpg", "notes.jpg"]
  assert all(s["reason"] for s in info["skipped"])
  vocab = vocab_lib.Vocabulary.load(out)
  # Skipped images' captions never reach the vocabulary.
  assert "zebra" not in vocab.words and "giraffe" not in vocab.words
  assert info["vocab_size"] == len(vocab)

  by_id = {it["id"]: it for it in items}
  seen = 0
  for split, n in info["splits"].items():
    data = input_pipeline.load_split(out, split)
    assert len(data) == n and data.images.shape[1:] == (32, 32, 3)
    for i in range(n):
      item = by_id[int(data.image_id[i])]
      assert data.file_name[i] == item["file_path"]
      for c in range(data.num_captions[i]):
        want = vocab.encode(vocab_lib.tokenize(item["captions"][c]), 5)
        got = [int(x) for x in data.captions[i, c] if x]
        assert got == want
      # Images are the originals resized: compare with PIL's own resize.
      ref = np.asarray(Image.open(os.path.join(root, item["file_path"])).convert("RGB")
                       .resize((32, 32), Image.BICUBIC), dtype=np.float32)
      # Stored as JPEG (the default --image_format): lossy, but close.
      assert np.abs(data.images[i].astype(np.float32) - ref).mean() < 6
    seen += n
  assert seen == 12
  anns = json.load(open(records.annotations_path(out, "test")))
  assert {a["image_id"] for a in anns["annotations"]} == {im["id"] for im in anns["images"]}


def test_vocab_counts_only_training_captions(tmp_path):
  root = tmp_path / "imgs"
  paths = _write_images(str(root), 4)
  items = [{"file_path": p, "captions": ["common word here", cap], "split": split}
           for p, cap, split in zip(paths, ["alpha", "beta", "gamma", "delta"],
                                    ["train", "train", "val", "test"])]
  raw = tmp_path / "raw.json"
  raw.write_text(json.dumps(items))
  out = str(tmp_path / "out")
  assert _run_prepro(raw, root, out, "--word_count_threshold=0") == 0
  words = vocab_lib.Vocabulary.load(out).words
  assert set(words) == {"common", "word", "here", "alpha", "beta", "UNK"}
  out2 = str(tmp_path / "out2")
  assert _run_prepro(raw, root, out2, "--word_count_threshold=0", "--vocab_from_all_splits") == 0
  assert {"gamma", "delta"} <= set(vocab_lib.Vocabulary.load(out2).words)


def test_rerun_is_idempotent(raw_set, tmp_path):
  raw, root, _ = raw_set
  out = str(tmp_path / "out")
  assert _run_prepro(raw, root, out) == 0
  first = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
  assert _run_prepro(raw, root, out, "--force") == 0  # really redone, not up to date
  second = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
  assert first == second  # dataset_info.json included: nothing in it varies by run


def test_records_are_serialized_deterministically(raw_set, tmp_path):
  """Each record is its Example serialized with sorted map keys, so the bytes
  do not depend on the process's protobuf map order (another run, another
  number of workers, writes the same shards)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  raw, root, _ = raw_set
  out = str(tmp_path / "out")
  assert _run_prepro(raw, root, out) == 0
  n = 0
  for path in records.split_files(out, "train"):
    for rec in tf.data.TFRecordDataset(path).as_numpy_iterator():
      assert rec == tf.train.Example.FromString(rec).SerializeToString(deterministic=True)
      n += 1
  assert n == 8


def test_warns_when_no_image_is_left_for_training(raw_set, tmp_path, capsys):
  raw, root, _ = raw_set
  out = str(tmp_path / "out")
  assert _run_prepro(raw, root, out, "--num_val=5000") == 0  # NeuralTalk2's default
  err = capsys.readouterr().err
  assert "warning: no training images" in err and "--num_val=5000" in err
  assert "train" not in records.load_info(out)["splits"]
  assert _run_prepro(raw, root, str(tmp_path / "out2")) == 0
  assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "expected a JSON list"),
    ('[{"captions": ["x"]}]', "missing field 'file_path'"),
    ('[{"file_path": "a.jpg"}]', "missing field 'captions'"),
    ('[{"file_path": "a.jpg", "captions": [1, 2]}]', "list of strings"),
    ('[{"file_path": 123, "captions": ["x"]}]', "'file_path' must be a string"),
    ('[{"file_path": "a.jpg", "tokens": [["a", 2]]}]', "lists of strings"),
])
def test_bad_input_json_is_one_clear_line(tmp_path, capsys, content, message):
  raw = tmp_path / "raw.json"
  raw.write_text(content)
  assert _run_prepro(raw, tmp_path, str(tmp_path / "out")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "raw.json" in err[0] and message in err[0]


def test_a_worker_killed_by_the_os_is_named_and_the_rest_kept(raw_set, tmp_path, capsys,
                                                               monkeypatch):
  """A worker SIGKILLed while decoding (as the out-of-memory killer does): the
  run ends, names the image, retries it once in a fresh worker and then skips
  it; an image whose first worker died but whose retry worked is kept."""
  raw, root, items = raw_set
  good = open(os.path.join(root, items[1]["file_path"]), "rb").read()
  for name in ("poison.jpg", "flaky.jpg"):
    open(os.path.join(root, name), "wb").write(good)
  items = items + [{"file_path": "poison.jpg", "captions": ["a poison image"], "id": 990},
                   {"file_path": "flaky.jpg", "captions": ["a flaky image"], "id": 991}]
  raw = tmp_path / "raw_kill.json"
  raw.write_text(json.dumps(items))
  # The spawned workers run pool_helpers.decode_or_die: prepro's worker, except
  # that it kills its own process on "poison" (always) and "flaky" (once).
  monkeypatch.setattr(prepro, "_process_image", pool_helpers.decode_or_die)
  out = str(tmp_path / "out")
  assert _run_prepro(raw, root, out, "--num_workers=2") == 0
  err = capsys.readouterr().err
  killed = "the worker decoding it was killed by SIGKILL"
  assert f"poison.jpg: {killed}" in err and "retrying it in a fresh worker" in err
  assert "skipping it" in err
  assert f"flaky.jpg: {killed}" in err
  info = records.load_info(out)
  skipped = {s["file"]: s["reason"] for s in info["skipped"]}
  assert set(skipped) == {"broken.jpg", "missing.jpg", "notes.jpg", "poison.jpg"}
  assert "killed by SIGKILL" in skipped["poison.jpg"] and "2 times" in skipped["poison.jpg"]
  assert f"skipped poison.jpg: {skipped['poison.jpg']}" in err
  written = set()
  for split in info["splits"]:
    written |= set(input_pipeline.load_split(out, split).file_name)
  assert written == {it["file_path"] for it in items} - set(skipped)
  assert "flaky.jpg" in written and len(written) == 13


@pytest.mark.parametrize("flag,words", [
    ("--num_val=-5", "none may be negative"), ("--image_size=100000", "--image_size=100000"),
])
def test_bad_sizes_and_counts_fail_at_once(raw_set, tmp_path, capsys, flag, words):
  raw, root, _ = raw_set
  assert _run_prepro(raw, root, str(tmp_path / "out"), flag) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and words in err[0], err
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".prepro-")]  # no work left


def test_a_crash_while_swapping_never_leaves_an_accepted_output(raw_set, tmp_path, monkeypatch):
  raw, root, _ = raw_set
  out = str(tmp_path / "out")
  assert _run_prepro(raw, root, out) == 0
  real, moved = os.replace, []

  def crash_after_two(src, dst):
    if len(moved) == 2:
      raise OSError(5, "simulated crash")
    moved.append(dst)
    return real(src, dst)

  monkeypatch.setattr(os, "replace", crash_after_two)
  assert _run_prepro(raw, root, out, "--force") == 2
  monkeypatch.setattr(os, "replace", real)
  assert not os.path.exists(os.path.join(out, records.INFO_FILE))  # not taken for finished
  assert _run_prepro(raw, root, out) == 0 and records.load_info(out)["num_images"] > 0


def test_work_folders_of_killed_runs_are_removed(raw_set, tmp_path):
  raw, root, _ = raw_set
  dead, alive = tmp_path / ".prepro-999999999-x", tmp_path / f".prepro-{os.getpid()}-y"
  dead.mkdir()
  alive.mkdir()
  assert _run_prepro(raw, root, str(tmp_path / "out")) == 0
  assert not dead.exists() and alive.exists()


def test_a_threshold_that_leaves_no_vocabulary_warns(raw_set, tmp_path, capsys):
  raw, root, _ = raw_set
  assert _run_prepro(raw, root, str(tmp_path / "out"), "--word_count_threshold=1000000") == 0
  assert "leaves a vocabulary of" in capsys.readouterr().err
