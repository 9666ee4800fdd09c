"""The tf.data pipeline: shapes, ops eager vs in tf.data, eval padding, exact resume."""

import numpy as np
import pytest
import tensorflow as tf

from captionjax import input_pipeline as ip
from captionjax import records
from captionjax import vocab as vocab_lib


@pytest.fixture(scope="module")
def train(shapes_dir):
  return ip.load_split(shapes_dir, "train")


def test_batch_shapes_and_dtypes(train, shapes_dir):
  info = records.load_info(shapes_dir)
  it = ip.TrainIterator(train, 8, seq_per_img=5, seed=0)
  b = next(it)
  L = info["max_length"] + 2
  assert b["image"].shape == (8, 64, 64, 3) and b["image"].dtype == np.uint8
  assert b["captions"].shape == (8, 5, L) and b["captions"].dtype == np.int32
  assert b["mask"].shape == (8, 5, L) and b["mask"].dtype == np.float32
  assert b["image_id"].shape == (8,)
  v = info["vocab_size"]
  assert b["captions"].min() >= 0 and b["captions"].max() <= v
  # START at 0, mask covers the words and the first END exactly.
  assert (b["captions"][..., 0] == 0).all()
  n = (b["captions"] > 0).sum(-1)
  assert (b["mask"].sum(-1) == n + 1).all()
  assert (b["mask"][..., 0] == 0).all()


def test_crop_and_caption_choice_vary_but_stay_valid(train):
  it = ip.TrainIterator(train, 4, seq_per_img=3, seed=1, crop_size=56, flip=True)
  b = next(it)
  assert b["image"].shape == (4, 56, 56, 3)
  for i in range(4):
    k = int(b["index"][i]) % len(train)
    del k  # the stream permutes; check captions come from the image itself
    row = int(np.nonzero(train.image_id == b["image_id"][i])[0][0])
    own = {tuple(c[c > 0]) for c in train.captions[row][: train.num_captions[row]]}
    for c in b["captions"][i]:
      assert tuple(c[c > 0]) in own


def _example(train, i):
  return {"image": tf.constant(train.images[i]), "captions": tf.constant(train.captions[i]),
          "num_captions": tf.constant(train.num_captions[i])}


@pytest.mark.parametrize("seeded", [False, True])
def test_ops_eager_equal_graph(train, seeded):
  seed = tf.constant([3, 4], tf.int64) if seeded else None

  def ops(ex):
    ex = ip.select_captions(ex, 7, seed)
    ex = ip.add_start_end(ex)
    return ip.crop_flip(ex, 48, True, None if seed is None else seed + 7)

  eager = ops(_example(train, 5))
  graph = next(iter(tf.data.Dataset.from_tensors(_example(train, 5)).map(ops)))
  for k in ("image", "captions", "mask"):
    np.testing.assert_array_equal(eager[k].numpy(), graph[k].numpy())
  assert eager["captions"].shape == (7, train.max_length + 2)


def test_select_captions_with_fewer_than_requested():
  ex = {"captions": tf.constant([[5, 6, 0], [7, 0, 0], [0, 0, 0]]), "num_captions": tf.constant(2)}
  got = ip.select_captions(ex, 5, tf.constant([1, 2], tf.int64))["captions"].numpy()
  assert {tuple(r) for r in got} <= {(5, 6, 0), (7, 0, 0)}
  assert {tuple(r) for r in got} == {(5, 6, 0), (7, 0, 0)}  # both used before repeats
  first = ip.select_captions(ex, 3)["captions"].numpy()
  np.testing.assert_array_equal(first, [[5, 6, 0], [7, 0, 0], [5, 6, 0]])


def test_eval_padding_keeps_every_example(shapes_dir):
  val = ip.load_split(shapes_dir, "val")
  batches = list(ip.eval_batches(val, 8, 5))
  assert all(b["image"].shape[0] == 8 for b in batches)
  real = np.concatenate([b["index"][b["_mask"] > 0] for b in batches])
  np.testing.assert_array_equal(real, np.arange(len(val)))
  assert batches[-1]["_mask"].sum() == len(val) % 8 or len(val) % 8 == 0


def test_stream_visits_each_image_once_per_epoch(train):
  n = len(train)
  it = ip.TrainIterator(train, n // 4, seq_per_img=1, seed=2)
  ids = np.concatenate([next(it)["image_id"] for _ in range(4)])
  assert sorted(ids) == sorted(train.image_id)
  ids2 = np.concatenate([next(it)["image_id"] for _ in range(4)])
  assert sorted(ids2) == sorted(train.image_id) and not np.array_equal(ids, ids2)


def test_iterator_save_restore_gives_the_same_batches(train):
  a = ip.TrainIterator(train, 6, seq_per_img=5, seed=0, crop_size=60)
  for _ in range(7):
    next(a)
  state = a.get_state()
  want = [next(a) for _ in range(5)]
  b = ip.TrainIterator(train, 6, seq_per_img=5, seed=0, crop_size=60)
  b.set_state(state)
  got = [next(b) for _ in range(5)]
  for x, y in zip(want, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  c = ip.TrainIterator(train, 6, seq_per_img=5, seed=1, crop_size=60)
  c.set_state(state)
  assert not np.array_equal(next(c)["image_id"], want[0]["image_id"])


def test_encoded_and_decoded_storage_agree(shapes_dir):
  dec = ip.load_split(shapes_dir, "test", decode=True)
  enc = ip.load_split(shapes_dir, "test", decode=False)
  assert enc.images.dtype == object
  a = next(ip.eval_batches(dec, 4, 5))
  b = next(ip.eval_batches(enc, 4, 5))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_captions_decode_to_the_references(shapes_dir):
  import json
  test = ip.load_split(shapes_dir, "test")
  vocab = vocab_lib.Vocabulary.load(shapes_dir)
  anns = json.load(open(records.annotations_path(shapes_dir, "test")))
  refs = {}
  for a in anns["annotations"]:
    refs.setdefault(a["image_id"], []).append(" ".join(vocab_lib.tokenize(a["caption"])))
  for i in range(len(test)):
    got = [vocab.decode(c) for c in test.captions[i][: test.num_captions[i]]]
    assert got == refs[int(test.image_id[i])]


def test_missing_split_is_a_clear_error(shapes_dir):
  with pytest.raises(FileNotFoundError, match="no records for split 'nope'"):
    ip.load_split(shapes_dir, "nope")
