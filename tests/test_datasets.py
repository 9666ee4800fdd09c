"""The input layouts of `captionjax prepro`: Karpathy JSON, Flickr token files
with split lists, captions CSV and TFDS (mocked), each on a small generated
stand-in, read and preprocessed end to end."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from captionjax import cli
from captionjax import datasets
from captionjax import input_pipeline
from captionjax import records
from captionjax import vocab as vocab_lib

# Flickr-style captions (five per image, as Flickr8k has), some not ASCII.
CAPTIONS = [
    ["A black dog is running through the grass .", "A dog runs across a green field .",
     "The black dog is playing outside .", "A dog running on grass .",
     "A happy dog sprints over the lawn ."],
    ["Two children are playing in the sand at the beach .", "Kids build a sandcastle .",
     "Two young kids playing on the beach .", "Children dig in the sand near the ocean .",
     "A boy and a girl play at the beach ."],
    ["A man in a red jacket climbs a rock wall .", "A climber on a steep rock face .",
     "A man is rock climbing .", "Someone climbs up a cliff .",
     "A rock climber in red scales the wall ."],
    ["A woman rides a bicycle down a city street .", "A cyclist on a busy road .",
     "Une femme fait du vélo dans la rue .", "A lady riding her bike in traffic .",
     "A woman on a bike near cars ."],
    ["A brown dog catches a frisbee in mid-air .", "The dog jumps to catch a frisbee .",
     "A dog leaping for a flying disc .", "犬がフリスビーをキャッチする 。",
     "A brown dog jumping in a park ."],
    ["A group of people stand on a snowy mountain .", "Skiers rest on the slope .",
     "People in ski gear on the snow .", "Several skiers at the top of a hill .",
     "Eine Gruppe Skifahrer im Schnee ."],
]


def _write_image(path, seed, size=(48, 40), fmt=None):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
  arr = np.asarray(Image.fromarray(small).resize(size, Image.BILINEAR))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, fmt)


def _prepro(*flags, out, workers=1):
  return cli.main(["prepro", *flags, f"--output_dir={out}", "--max_length=8",
                   "--word_count_threshold=0", "--image_size=32", f"--num_workers={workers}",
                   "--no_progress"])


def _check_output(out, want_captions):
  """Every kept image's records hold its captions, encoded with the vocabulary.

  want_captions: {file_name: [caption, ...]} of the images that must be there.
  """
  info = records.load_info(out)
  vocab = vocab_lib.Vocabulary.load(out)
  seen = {}
  for split, n in info["splits"].items():
    data = input_pipeline.load_split(out, split)
    assert len(data) == n and data.images.shape[1:] == (32, 32, 3)
    for i, name in enumerate(data.file_name):
      seen[name] = split
      caps = want_captions[name]
      assert data.num_captions[i] == len(caps)
      for c, text in enumerate(caps):
        want = vocab.encode(vocab_lib.tokenize(text), 8)
        assert [int(x) for x in data.captions[i, c] if x] == want
  assert set(seen) == set(want_captions)
  return info, vocab, seen


# ------------------------------------------------------------- Karpathy JSON


def _karpathy_set(tmp_path, filepath=True):
  """A dataset_coco.json-like file: 2 train, 1 val, 1 test, 2 restval."""
  root = tmp_path / "coco"
  splits = ["train", "train", "val", "test", "restval", "restval"]
  images = []
  for i, split in enumerate(splits):
    folder = "train2014" if split == "train" else "val2014"
    name = f"COCO_{folder}_{i:012d}.jpg"
    _write_image(str(root / folder / name), i)
    sentences = []
    for j, raw in enumerate(CAPTIONS[i]):
      s = {"raw": raw, "imgid": i, "sentid": 5 * i + j}
      if j != 4:  # the last sentence of each image has no tokens: the rule applies
        s["tokens"] = vocab_lib.tokenize(raw)
      sentences.append(s)
    im = {"filename": name, "imgid": i, "cocoid": 1000 + i, "split": split,
          "sentences": sentences, "sentids": [5 * i + j for j in range(5)]}
    if filepath:
      im["filepath"] = folder
    images.append(im)
  # Tokens, when present, win over the raw text: a word only the tokens have.
  images[0]["sentences"][0]["tokens"] = ["a", "black", "dog", "is", "sprinting", "tokenonly"]
  path = tmp_path / "dataset_coco.json"
  path.write_text(json.dumps({"images": images, "dataset": "coco"}, ensure_ascii=False),
                  encoding="utf-8")
  return str(path), str(root), images


def test_karpathy_reader_fields(tmp_path):
  path, _, images = _karpathy_set(tmp_path)
  items = datasets.read_karpathy_json(path)
  assert [it["split"] for it in items] == ["train"] * 2 + ["val", "test"] + ["train"] * 2
  assert [it["id"] for it in items] == [1000 + i for i in range(6)]  # cocoid wins
  assert items[2]["file_path"] == os.path.join("val2014", images[2]["filename"])
  assert items[0]["tokens"][0][-1] == "tokenonly"
  assert items[3]["tokens"][4] == vocab_lib.tokenize(CAPTIONS[3][4])
  assert items[3]["captions"] == CAPTIONS[3]
  kept = datasets.read_karpathy_json(path, restval="keep")
  assert [it["split"] for it in kept][4:] == ["restval", "restval"]
  notes = []
  assert len(datasets.read_karpathy_json(path, restval="drop", notes=notes)) == 4
  assert "2 restval images left out" in notes[0]


def test_karpathy_prepro_vocab_rules(tmp_path):
  path, root, images = _karpathy_set(tmp_path)
  out = str(tmp_path / "out")
  assert _prepro(f"--karpathy_json={path}", f"--images_root={root}", out=out) == 0
  info = records.load_info(out)
  assert info["splits"] == {"train": 4, "val": 1, "test": 1}  # restval folded in
  words = set(vocab_lib.Vocabulary.load(out).words)
  train_caps = [c for i in (0, 1, 4, 5) for c in CAPTIONS[i] if c != CAPTIONS[0][0]]
  train_words = {w for c in train_caps for w in vocab_lib.tokenize(c)}
  train_words |= {"a", "black", "dog", "is", "sprinting", "tokenonly", "UNK"}
  assert "through" not in words  # only in the raw text whose tokens replace it
  # The vocabulary is the kept training images' words (restval included), no more.
  assert words == train_words
  assert "vélo" not in words and "climber" not in words  # val/test only
  assert info["source"] == {"karpathy_json": path, "restval": "train"}

  out2 = str(tmp_path / "out2")
  assert _prepro(f"--karpathy_json={path}", f"--images_root={root}", "--restval=keep",
                 "--vocab_from_all_splits", out=out2) == 0
  info2 = records.load_info(out2)
  assert info2["splits"] == {"train": 2, "restval": 2, "val": 1, "test": 1}
  assert {"vélo", "climber"} <= set(vocab_lib.Vocabulary.load(out2).words)
  # Records hold the tokens (not the re-tokenized raw text) and the COCO ids.
  data = input_pipeline.load_split(out, "train")
  vocab = vocab_lib.Vocabulary.load(out)
  row = list(data.image_id).index(1000)
  assert vocab.decode(data.captions[row, 0]) == "a black dog is sprinting tokenonly"
  # The references keep the raw text, for the metrics.
  anns = json.load(open(records.annotations_path(out, "val"), encoding="utf-8"))
  assert [a["caption"] for a in anns["annotations"]] == CAPTIONS[2]
  assert anns["images"][0]["id"] == 1002


def test_karpathy_without_filepath_and_missing_image(tmp_path, capsys):
  # Flickr8k/30k's Karpathy files have no 'filepath'; one image is missing.
  path, root, images = _karpathy_set(tmp_path, filepath=False)
  for im in images:
    folder = "train2014" if im["split"] == "train" else "val2014"
    os.replace(os.path.join(root, folder, im["filename"]), os.path.join(root, im["filename"]))
  os.remove(os.path.join(root, images[1]["filename"]))
  out = str(tmp_path / "out")
  assert _prepro(f"--karpathy_json={path}", f"--images_root={root}", out=out) == 0
  info = records.load_info(out)
  assert info["splits"] == {"train": 3, "val": 1, "test": 1}
  assert info["skipped"] == [{"file": images[1]["filename"], "reason": "file not found"}]
  assert images[1]["filename"] in capsys.readouterr().err
  # A skipped training image's words do not reach the vocabulary.
  assert "sandcastle" not in vocab_lib.Vocabulary.load(out).words


@pytest.mark.parametrize("data,message", [
    ([1, 2], "expected an object with an 'images' list"),
    ({"images": [{"split": "train", "sentences": []}]}, "images[0]: missing field 'filename'"),
    ({"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]},
     "images[0]: field 'split' is 'dev'"),
    ({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"x": 1}]}]},
     "sentences[0] needs 'raw' text or a 'tokens' list"),
    ({"images": [{"filename": "a.jpg", "split": "train", "imgid": "7",
                  "sentences": [{"raw": "a cat"}]}]}, "field 'imgid' must be an integer"),
])
def test_karpathy_bad_input_is_one_clear_line(tmp_path, capsys, data, message):
  path = tmp_path / "dataset_flickr8k.json"
  path.write_text(json.dumps(data))
  assert _prepro(f"--karpathy_json={path}", out=str(tmp_path / "out")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "dataset_flickr8k.json" in err[0] and message in err[0], err


# ------------------------------------------------------------ Flickr8k layout


def _flickr_set(tmp_path, with_lists=True):
  """Flickr8k's layout: Flickr8k_text/ (token file, split lists), images apart."""
  text_dir, img_dir = tmp_path / "Flickr8k_text", tmp_path / "Flicker8k_Dataset"
  text_dir.mkdir()
  names = [f"{1000268201 + 7 * i}_{i:02d}a3b8cb0e.jpg" for i in range(6)]
  lines = []
  for name, caps in zip(names, CAPTIONS):
    for j, c in enumerate(caps):
      sep = " " if j == 0 else "\t"  # as in the real file, a few keys end in a space
      lines.append(f"{name}#{j}{sep}{c}")
  # The real file's quirk: captions of a '.jpg.1' image that is in no list.
  lines.append("2258277193_586949ec62.jpg.1#0\tpeople waiting for the subway")
  (text_dir / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  for i, name in enumerate(names):
    _write_image(str(img_dir / name), 10 + i)
  if with_lists:
    (text_dir / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:4]) + "\n")
    (text_dir / "Flickr_8k.devImages.txt").write_text(names[4] + "\n")
    (text_dir / "Flickr_8k.testImages.txt").write_text(names[5] + "\n" + "9999_missing.jpg\n")
  return str(text_dir / "Flickr8k.token.txt"), str(img_dir), names


def test_flickr_token_with_split_lists(tmp_path, capsys):
  token, img_dir, names = _flickr_set(tmp_path)
  notes = []
  items = datasets.read_flickr_token(token, notes=notes)
  assert [it["file_path"] for it in items] == names
  assert [it["split"] for it in items] == ["train"] * 4 + ["val", "test"]
  assert items[0]["captions"] == CAPTIONS[0]  # the space-separated first line too
  assert any("1 captioned images are in no split list" in n for n in notes)
  assert any("1 images of the split lists have no captions" in n for n in notes)

  out = str(tmp_path / "out")
  assert _prepro(f"--flickr_token={token}", f"--images_root={img_dir}", out=out) == 0
  assert "in no split list" in capsys.readouterr().err
  info, vocab, seen = _check_output(out, dict(zip(names, CAPTIONS)))
  assert info["splits"] == {"train": 4, "val": 1, "test": 1}
  assert seen[names[4]] == "val" and seen[names[5]] == "test"
  assert "犬がフリスビーをキャッチする" not in vocab.words  # a val caption
  assert "skifahrer" not in vocab.words  # a test caption
  assert {"vélo", "sandcastle"} <= set(vocab.words)
  assert len(info["notes"]) == 2


def test_flickr_token_explicit_lists_and_no_lists(tmp_path):
  token, img_dir, names = _flickr_set(tmp_path, with_lists=False)
  items = datasets.read_flickr_token(token)
  assert len(items) == 7 and all("split" not in it for it in items)
  lists = tmp_path / "lists"
  lists.mkdir()
  (lists / "tr.txt").write_text("\n".join(names[1:5]))
  (lists / "te.txt").write_text(names[0])
  out = str(tmp_path / "out")
  assert _prepro(f"--flickr_token={token}", f"--images_root={img_dir}",
                 f"--train_list={lists / 'tr.txt'}", f"--test_list={lists / 'te.txt'}",
                 out=out) == 0
  assert records.load_info(out)["splits"] == {"train": 4, "test": 1}
  # No lists at all: NeuralTalk2's seeded random split; the '.jpg.1' entry is skipped.
  out2 = str(tmp_path / "out2")
  assert _prepro(f"--flickr_token={token}", f"--images_root={img_dir}", "--num_val=1",
                 "--num_test=1", out=out2) == 0
  info = records.load_info(out2)
  assert sum(info["splits"].values()) == 6 and info["splits"]["val"] == 1
  assert [s["file"] for s in info["skipped"]] == ["2258277193_586949ec62.jpg.1"]


def test_flickr_token_errors_name_file_and_line(tmp_path, capsys):
  token = tmp_path / "Flickr8k.token.txt"
  token.write_text("a.jpg#0\tA dog .\nthis line has no key\n")
  assert _prepro(f"--flickr_token={token}", out=str(tmp_path / "o")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "Flickr8k.token.txt: line 2" in err[0]
  token.write_text("a.jpg#0\tA dog .\n")
  (tmp_path / "tr.txt").write_text("a.jpg\n")
  (tmp_path / "te.txt").write_text("a.jpg\n")
  assert _prepro(f"--flickr_token={token}", f"--train_list={tmp_path / 'tr.txt'}",
                 f"--test_list={tmp_path / 'te.txt'}", out=str(tmp_path / "o")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "a.jpg is also in the train list" in err[0]
  token.write_bytes(b"a.jpg#0\tcaf\xe9\n")  # Latin-1, not UTF-8
  assert _prepro(f"--flickr_token={token}", out=str(tmp_path / "o")) == 2
  assert "line 1: not UTF-8" in capsys.readouterr().err


# ----------------------------------------------------------------- captions CSV


def test_captions_csv_kaggle_layout(tmp_path):
  # Kaggle's Flickr8k captions.txt: a header, one row per caption, a BOM here,
  # quoted captions with commas, rows of one image not adjacent.
  root = tmp_path / "Images"
  names = [f"photo_{i}.jpg" for i in range(4)] + ["sub dir/photo 4.png"]
  for i, n in enumerate(names):
    _write_image(str(root / n), 20 + i)
  rows = ["image,caption"]
  for j in range(5):
    for n, caps in zip(names, CAPTIONS):
      c = caps[j]
      rows.append(f'{n},"{c}"' if j % 2 else f"{n},{c}")
  rows.append(f'{names[0]},"A dog, black and fast, runs ."')
  rows.append(f"{names[1]},")  # an empty caption: ignored, noted
  path = tmp_path / "captions.txt"
  path.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
  notes = []
  items = datasets.read_captions_csv(str(path), notes)
  assert [it["file_path"] for it in items] == names
  assert items[0]["captions"] == CAPTIONS[0] + ["A dog, black and fast, runs ."]
  assert items[4]["captions"] == CAPTIONS[4]
  assert notes == [f"{path}: 1 rows with an empty caption ignored"]
  out = str(tmp_path / "out")
  assert _prepro(f"--captions_csv={path}", f"--images_root={root}", "--num_val=1",
                 "--num_test=1", out=out) == 0
  want = {it["file_path"]: it["captions"] for it in items}
  info, _, _ = _check_output(out, want)
  assert info["splits"] == {"train": 3, "val": 1, "test": 1}


def test_captions_csv_pipes_split_and_id_columns(tmp_path):
  # Kaggle's Flickr30k results.csv separates with '| '; here with split and id columns.
  root = tmp_path / "imgs"
  rows = ["image_name| comment_number| comment| split| image_id"]
  for i in range(3):
    _write_image(str(root / f"{i}.jpg"), 30 + i)
    for j, c in enumerate(CAPTIONS[i]):
      rows.append(f"{i}.jpg| {j}| {c}| {['train', 'train', 'val'][i]}| {70 + i}")
  path = tmp_path / "results.csv"
  path.write_text("\n".join(rows) + "\n", encoding="utf-8")
  items = datasets.read_captions_csv(str(path))
  assert [(it["file_path"], it["split"], it["id"]) for it in items] == [
      ("0.jpg", "train", 70), ("1.jpg", "train", 71), ("2.jpg", "val", 72)]
  assert items[2]["captions"] == CAPTIONS[2]
  out = str(tmp_path / "out")
  assert _prepro(f"--captions_csv={path}", f"--images_root={root}", out=out) == 0
  info, _, _ = _check_output(out, {it["file_path"]: it["captions"] for it in items})
  assert info["splits"] == {"train": 2, "val": 1}
  assert sorted(input_pipeline.load_split(out, "train").image_id) == [70, 71]


@pytest.mark.parametrize("content,message", [
    ("", "empty file"),
    ("picture,caption\na.jpg,a dog\n", "no image column in the header ['picture', 'caption']"),
    ("image,words\na.jpg,a dog\n", "no caption column"),
    ("image,caption\na.jpg\n", "line 2: expected 2 fields, got 1"),
    ("image,caption,split\na.jpg,a dog,train\na.jpg,a cat,test\n",
     "line 3: a.jpg is in split 'test' here but 'train'"),
    ("image,caption,id\na.jpg,a dog,x7\n", "line 2: id 'x7' is not an integer"),
    ("image,caption\n", "no caption rows"),
])
def test_captions_csv_errors(tmp_path, capsys, content, message):
  path = tmp_path / "caps.csv"
  path.write_text(content)
  assert _prepro(f"--captions_csv={path}", out=str(tmp_path / "o")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "caps.csv" in err[0] and message in err[0], err


def test_no_input_and_two_inputs(tmp_path, capsys):
  assert _prepro(out=str(tmp_path / "o")) == 2
  assert "pass one of --input_json, --karpathy_json" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # argparse: mutually exclusive
    _prepro("--input_json=a.json", "--captions_csv=b.csv", out=str(tmp_path / "o"))


# ------------------------------------------------------------------------ TFDS


def _coco_examples(n):
  """Examples in coco_captions' structure: generated images, real-looking text."""
  out = []
  for i in range(n):
    rng = np.random.default_rng(40 + i)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((40 + i, 36), Image.BILINEAR))
    caps = CAPTIONS[i % len(CAPTIONS)]
    out.append({
        "image": img,
        "image/filename": f"COCO_val2014_{500 + i:012d}.jpg",
        "image/id": 500 + i,
        "captions": {"id": np.arange(len(caps), dtype=np.int64) + 10 * i, "text": caps},
        "objects": {"area": np.array([30], np.int64), "bbox": np.array([[.1, .2, .5, .6]], np.float32),
                    "id": np.array([i], np.int64), "is_crowd": np.array([False]),
                    "label": np.array([i % 80], np.int64)},
    })
  return out


SPLIT_SIZES = {"train": 3, "restval": 2, "val": 1, "test": 1}


def _fake_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
  """Stands in for the prepared files: examples serialized and parsed with the
  builder's own features, as real TFDS records are."""
  import tensorflow as tf
  del read_config, shuffle_files
  start = {"train": 0, "restval": 3, "val": 5, "test": 6}[split]
  exs = _coco_examples(7)[start:start + SPLIT_SIZES[split]]
  feats = self.info.features
  data = [feats.serialize_example(ex) for ex in exs]
  return tf.data.Dataset.from_tensor_slices(data).map(
      lambda x: feats.deserialize_example(x, decoders=decoders))


def test_tfds_coco_captions_mocked(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  builder = tfds.builder("coco_captions", data_dir=str(tmp_path / "tfds"), try_gcs=False)
  feats = builder.info.features
  # The real coco_captions builder's structure, which the reader relies on.
  assert {"image", "image/id", "image/filename", "captions", "objects"} <= set(feats)
  assert set(feats["captions"].feature) == {"text", "id"}
  assert isinstance(feats["image"], tfds.features.Image)
  with tfds.testing.mock_data(as_dataset_fn=_fake_as_dataset):
    items = datasets.read_tfds("coco_captions", str(tmp_path / "tfds"),
                               str(tmp_path / "spill.bin"))
    assert [it["split"] for it in items] == ["train"] * 5 + ["val", "test"]
    assert [it["id"] for it in items] == list(range(500, 507))
    assert items[6]["captions"] == CAPTIONS[0]
    # The stored JPEG (coco_captions' image encoding) is copied, not decoded.
    path, off, n = items[1]["image_range"]
    with open(path, "rb") as f:
      f.seek(off)
      jpeg = f.read(n)
    assert jpeg[:2] == b"\xff\xd8"
    got = np.asarray(Image.open(io.BytesIO(jpeg)), np.float32)
    assert np.abs(got - _coco_examples(2)[1]["image"]).mean() < 4

    out = str(tmp_path / "out")
    assert _prepro("--tfds=coco_captions", f"--tfds_data_dir={tmp_path / 'tfds'}",
                   "--restval=keep", out=out) == 0
  info = records.load_info(out)
  assert info["splits"] == SPLIT_SIZES
  want = {ex["image/filename"]: ex["captions"]["text"] for ex in _coco_examples(7)}
  _check_output(out, want)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".prepro")]  # spill removed


def test_tfds_without_prepared_data_is_a_clear_error(tmp_path, capsys):
  pytest.importorskip("tensorflow_datasets")
  assert _prepro("--tfds=coco_captions", f"--tfds_data_dir={tmp_path}",
                 out=str(tmp_path / "o")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--tfds=coco_captions" in err[0] and "not prepared" in err[0], err
  assert _prepro("--tfds=coco_captions", out=str(tmp_path / "o")) == 2
  assert "--tfds needs --tfds_data_dir" in capsys.readouterr().err


# --------------------------------------------------------- re-runs, end to end


def test_rerun_and_worker_count_give_identical_output(tmp_path):
  token, img_dir, _ = _flickr_set(tmp_path)
  outs = []
  for k, workers in enumerate([2, 1, 1]):
    out = str(tmp_path / ("a" if k else "b"))
    assert _prepro(f"--flickr_token={token}", f"--images_root={img_dir}", "--shard_size=2",
                   "--force", out=out, workers=workers) == 0
    outs.append({f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))})
  assert "train-00001-of-00002.tfrecord" in outs[0]
  assert outs[0] == outs[1] == outs[2]  # 2 workers == 1 worker; a re-run changes nothing


def test_rerun_when_up_to_date_does_nothing_until_an_input_changes(tmp_path, capsys):
  token, img_dir, names = _flickr_set(tmp_path)
  out = str(tmp_path / "out")
  args = (f"--flickr_token={token}", f"--images_root={img_dir}")
  assert _prepro(*args, out=out) == 0
  shard = records.split_files(out, "val")[0]
  before = open(shard, "rb").read()
  os.utime(shard, ns=(1, 1))
  capsys.readouterr()
  assert _prepro(*args, out=out) == 0
  assert "is up to date" in capsys.readouterr().err
  assert os.stat(shard).st_mtime_ns == 1  # not rewritten
  # A changed setting, a changed image or --force: done again.
  assert _prepro(*args, "--force", out=out) == 0
  assert os.stat(shard).st_mtime_ns != 1 and open(shard, "rb").read() == before
  _write_image(os.path.join(img_dir, names[4]), 99)  # the val image's pixels change
  assert _prepro(*args, out=out) == 0
  assert "is up to date" not in capsys.readouterr().err
  assert open(shard, "rb").read() != before
  os.remove(records.split_files(out, "test")[0])  # an incomplete output is redone
  assert _prepro(*args, out=out) == 0
  assert records.split_files(out, "test")


def test_karpathy_layout_trains_end_to_end(tmp_path):
  """The one training run of this file: a Karpathy-layout set into train."""
  from captionjax import configs
  from captionjax import trainer
  path, root, _ = _karpathy_set(tmp_path)
  out = str(tmp_path / "prepro")
  assert _prepro(f"--karpathy_json={path}", f"--images_root={root}", out=out) == 0
  c = configs.load_config("default", [
      f"dataset={out}", "cnn_pretrain_steps=0", "num_train_steps=4", "batch_size=2",
      "model.cnn_kwargs.widths=(8,16,32)", "model.rnn_size=16",
      "model.input_encoding_size=16", "eval_every_steps=4", "eval_batch_size=2",
      "eval_num_images=1", "checkpoint_every_steps=4", "log_every_steps=2",
      "scst_steps=0"])  # cross-entropy only (test_scst covers the SCST phase)
  workdir = str(tmp_path / "run")
  result = trainer.train_and_evaluate(c, workdir, progress=False)
  assert "CIDEr" in result and result["splits"]["beam_size"] == 2
  caps = json.load(open(os.path.join(workdir, "captions.json"), encoding="utf-8"))
  assert [c["image_id"] for c in caps] == [1003]  # the one test image, by its COCO id
  log = [json.loads(line) for line in open(os.path.join(workdir, "train_log.jsonl"))]
  assert any(r.get("phase") == "val" for r in log)
