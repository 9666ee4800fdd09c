"""`captionjax caption` and `captionjax perplexity`, and the inference module.

Most tests use a workdir with random weights written here in the trainer's
checkpoint layout (fast); one loads the shared trained_workdir fixture to
check the real trainer's output end to end.
"""

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from captionjax import checkpoints
from captionjax import cli
from captionjax import inference
from captionjax import vocab as vocab_lib

# imageio-ffmpeg starts ffmpeg with subprocess; JAX warns about any fork. Compared
# with references (one-by-one captions, a token loop): full float32 matmuls (conftest).
pytestmark = [pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
              pytest.mark.usefixtures("highest_matmul_precision")]

IMAGE_SIZE = 32
MAX_LENGTH = 6
WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "<b>x</b>", "&amp;"]


def _tiny_model_config():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config("/nonexistent-data-dir")
  c.model.cnn_kwargs.widths = (8, 16)
  c.model.cnn_kwargs.grid = 2
  c.model.input_encoding_size = 16
  c.model.rnn_size = 16
  return c


def write_workdir(workdir: str, model: inference.Model, step: int = 7) -> str:
  """Saves `model` as `captionjax train` does: config, vocabulary, checkpoint."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(model.config.to_json_best_effort(indent=1))
  model.vocab.save(os.path.join(workdir, "vocab.json"))
  ckpt = checkpoints.Checkpointer(workdir, keep=2)
  state = {"step": np.int32(step), "params": model.params, "batch_stats": model.batch_stats}
  ckpt.save(step, state, {"step": step, "phase": checkpoints.PHASE_CAPTION,
                          "vocab_size": len(model.vocab), "image_size": model.image_size,
                          "max_length": model.max_length})
  ckpt.close()
  return workdir


@pytest.fixture(scope="module")
def model():
  # Bias the output layer so that captions have a few words (random weights
  # otherwise often end at once).
  m = inference.random_model(_tiny_model_config(), vocab_lib.Vocabulary(WORDS),
                             IMAGE_SIZE, MAX_LENGTH, seed=3)
  bias = np.array(m.params["lm"]["logit"]["bias"])
  bias[0] -= 1.5
  m.params["lm"]["logit"]["bias"] = bias
  return m


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, model):
  return write_workdir(str(tmp_path_factory.mktemp("random_run")), model)


def _png(image: np.ndarray, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "PNG", **kw)
  return buf.getvalue()


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
  """An asymmetric picture: blocks of colors, so rotations change the caption."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST))


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
  """Awkward but valid images, broken files, and a non-image file."""
  d = tmp_path_factory.mktemp("photos")
  upright = _pattern(40, 60, 0)
  (d / "a_upright.png").write_bytes(_png(upright))
  # Stored rotated, with EXIF orientation 6 ("rotate 90 CW to view"): shows as `upright`.
  stored = Image.fromarray(upright).transpose(Image.ROTATE_90)
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  stored.save(buf, "PNG", exif=exif)
  (d / "b_exif_rotated.png").write_bytes(buf.getvalue())
  buf = io.BytesIO()
  Image.new("CMYK", (50, 30), (0, 200, 200, 0)).save(buf, "JPEG")
  (d / "c_cmyk.jpg").write_bytes(buf.getvalue())
  (d / "d_gray.png").write_bytes(_png(_pattern(30, 30, 1)[..., 0]))
  rgba = np.concatenate([_pattern(30, 30, 2), np.full((30, 30, 1), 128, np.uint8)], -1)
  (d / "e_rgba.png").write_bytes(_png(rgba))
  sixteen = (np.arange(900, dtype=np.uint16).reshape(30, 30) * 70)
  buf = io.BytesIO()
  im16 = Image.fromarray(sixteen)
  assert im16.mode.startswith("I;16")
  im16.save(buf, "PNG")
  (d / "f_16bit.png").write_bytes(buf.getvalue())
  red, blue = np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20, 3), np.uint8)
  red[..., 0], blue[..., 2] = 255, 255
  buf = io.BytesIO()
  Image.fromarray(red).save(buf, "GIF", save_all=True, append_images=[Image.fromarray(blue)])
  (d / "g_anim.gif").write_bytes(buf.getvalue())
  (d / "g_red.png").write_bytes(_png(red))
  (d / "h_1x1.png").write_bytes(_png(np.full((1, 1, 3), 200, np.uint8)))
  buf = io.BytesIO()
  Image.fromarray(_pattern(3000, 4000, 4)).save(buf, "JPEG", quality=80)
  (d / "i_large.jpg").write_bytes(buf.getvalue())
  (d / "j_broken.jpg").write_bytes(b"this is not an image\n")
  (d / "k_empty.png").write_bytes(b"")
  buf = io.BytesIO()
  Image.fromarray(_pattern(64, 64, 5)).save(buf, "JPEG")
  (d / "l_truncated.jpg").write_bytes(buf.getvalue()[:300])
  (d / "notes.txt").write_text("not a picture")
  return str(d)


GOOD = ["a_upright.png", "b_exif_rotated.png", "c_cmyk.jpg", "d_gray.png", "e_rgba.png",
        "f_16bit.png", "g_anim.gif", "g_red.png", "h_1x1.png", "i_large.jpg"]
BROKEN = ["j_broken.jpg", "k_empty.png", "l_truncated.jpg"]


def _teacher_forced_logprob(model, image: np.ndarray, caption: str) -> float:
  """Sum of the log-probabilities of the caption's words and END, by teacher forcing."""
  ids = [model.vocab.word_to_ix[w] for w in caption.split()] if caption else []
  caps = np.zeros((1, 1, model.max_length + 2), np.int32)
  caps[0, 0, 1:1 + len(ids)] = ids
  logp = inference.token_log_probs(model, image[None], caps)[0, 0]
  return float(logp[:len(ids) + 1].sum())


def test_caption_folder(tmp_path, photo_dir, workdir, model, capsys):
  out, vis = tmp_path / "caps.json", tmp_path / "vis" / "vis.json"
  rc = cli.main(["caption", f"--checkpoint={workdir}", f"--images={photo_dir}",
                 f"--output={out}", "--beam_size=3", "--n_best=3", "--batch_size=4",
                 f"--vis_json={vis}", "--no_progress"])
  err = capsys.readouterr().err
  assert rc == 1  # some failed
  for name in BROKEN:
    assert name in err
  assert "notes.txt" in err  # ignored, and said so
  results = json.loads(out.read_text())
  assert [r["file_name"] for r in results] == GOOD
  # ids: 1-based positions in the sorted listing, broken files included
  listing = sorted(GOOD + BROKEN)
  assert [r["image_id"] for r in results] == [listing.index(n) + 1 for n in GOOD]
  by_name = {r["file_name"]: r for r in results}
  for r in results:
    assert len(r["n_best"]) == 3
    assert r["n_best"][0] == {"caption": r["caption"], "logprob": r["logprob"]}
    lps = [x["logprob"] for x in r["n_best"]]
    assert lps == sorted(lps, reverse=True)
    assert len({x["caption"] for x in r["n_best"]}) == 3
  # The logprob is the model's: recompute it by teacher forcing on the same input.
  for name in ("a_upright.png", "i_large.jpg", "h_1x1.png"):
    image = inference.image_loader(model)(os.path.join(photo_dir, name))[0]
    for alt in by_name[name]["n_best"]:
      assert _teacher_forced_logprob(model, image, alt["caption"]) == pytest.approx(
          alt["logprob"], abs=1e-3)
  # EXIF rotation applied; a GIF is its first frame.
  assert by_name["b_exif_rotated.png"]["n_best"] == by_name["a_upright.png"]["n_best"]
  assert by_name["g_anim.gif"]["n_best"] == by_name["g_red.png"]["n_best"]
  # NeuralTalk2's vis.json layout, with imgs/imgN.jpg beside it.
  v = json.loads(vis.read_text())
  assert v == [{"image_id": str(i), "caption": r["caption"]} for i, r in enumerate(results, 1)]
  assert sorted(os.listdir(vis.parent / "imgs")) == sorted(f"img{i}.jpg" for i in range(1, 11))


def test_batching_matches_one_by_one(photo_dir, model):
  """A padded, prefetched batch gives each image the caption it gets alone."""
  paths = [os.path.join(photo_dir, n) for n in GOOD[:5]]
  batched = inference.BatchCaptioner(model, batch_size=3, beam_size=2, n_best=2)
  items = list(inference.caption_files(batched, paths, workers=2))
  alone = inference.BatchCaptioner(model, batch_size=1, beam_size=2, n_best=2)
  load = inference.image_loader(model)
  for item, path in zip(items, paths):
    assert item.ok and item.path == path
    (want,) = alone(load(path)[0][None])
    assert [c for c, _ in item.captions] == [c for c, _ in want]
    np.testing.assert_allclose([s for _, s in item.captions], [s for _, s in want], atol=1e-4)
  # 5 images in batches of 3: the short last batch is padded, one compile.
  assert batched._fn._cache_size() == 1  # pylint: disable=protected-access


def test_caption_files_keeps_order_around_failures(tmp_path, model):
  good = _png(_pattern(32, 32, 9))
  names = ["bad0", "ok1", "bad2", "ok3", "ok4", "bad5", "bad6", "ok7"]
  paths = []
  for n in names:
    p = tmp_path / f"{n}.png"
    p.write_bytes(good if n.startswith("ok") else b"junk")
    paths.append(str(p))
  cap = inference.BatchCaptioner(model, batch_size=2, beam_size=1)
  items = list(inference.caption_files(cap, paths, workers=3))
  assert [os.path.basename(i.path)[:-4] for i in items] == names
  assert [i.index for i in items] == list(range(len(names)))
  assert [i.ok for i in items] == [n.startswith("ok") for n in names]
  assert all("not an image" in i.error for i in items if not i.ok)
  assert len({i.captions[0] for i in items if i.ok}) == 1  # same picture, same caption


def test_sample(tmp_path, photo_dir, workdir, model):
  out = tmp_path / "s.json"
  path = os.path.join(photo_dir, "a_upright.png")
  assert cli.main(["caption", f"--checkpoint={workdir}", f"--images={path}", f"--output={out}",
                   "--sample", "--temperature=5", "--seed=1", "--no_progress"]) == 0
  (r,) = json.loads(out.read_text())
  assert r["file_name"] == "a_upright.png" and r["image_id"] == 1
  image = inference.image_loader(model)(path)[0]
  # The reported logprob is under the model itself (temperature 1).
  assert _teacher_forced_logprob(model, image, r["caption"]) == pytest.approx(
      r["logprob"], abs=1e-3)
  sampler = inference.BatchCaptioner(model, batch_size=1, temperature=5.0, seed=1)
  draws = [sampler(image[None])[0][0] for _ in range(6)]
  assert draws[0][0] == r["caption"]  # same seed, same first sample
  assert len({c for c, _ in draws}) > 1  # temperature 5 over random weights: samples vary


def test_decoding_flags(tmp_path, photo_dir, workdir, model):
  """Diverse beam search with the constraints, and several samples per image."""
  image = inference.image_loader(model)(os.path.join(photo_dir, "a_upright.png"))[0]
  bad = {"a", "the", "on"}
  runs = {
      "beam": ["--beam_size=4", "--num_groups=2", "--diversity_lambda=2", "--n_best=4",
               "--block_trigrams", "--min_length=2", "--bad_endings=a,the,on"],
      "sample": ["--sample", "--num_samples=3", "--n_best=3", "--top_p=0.9", "--top_k=6",
                 "--temperature=2", "--bad_endings=a,the,on"],
  }
  for name, flags in runs.items():
    out = tmp_path / f"{name}.json"
    assert cli.main(["caption", f"--checkpoint={workdir}", f"--images={photo_dir}/a_upright.png",
                     f"--output={out}", "--no_progress"] + flags) == 0
    (r,) = json.loads(out.read_text())
    assert len(r["n_best"]) == (4 if name == "beam" else 3)
    lps = [x["logprob"] for x in r["n_best"]]
    assert lps == sorted(lps, reverse=True)
    for alt in r["n_best"]:
      words = alt["caption"].split()
      assert len(words) >= (2 if name == "beam" else 1)
      assert len(words) == MAX_LENGTH + 1 or words[-1] not in bad  # T = MAX_LENGTH + 1
      if name == "beam":
        trigrams = [tuple(words[j:j + 3]) for j in range(len(words) - 2)]
        assert len(set(trigrams)) == len(trigrams)
      # Logprobs are the model's own (unmasked, temperature 1).
      assert _teacher_forced_logprob(model, image, alt["caption"]) == pytest.approx(
          alt["logprob"], abs=1e-3)


def test_ensemble(tmp_path, photo_dir, workdir, model, capsys):
  """--checkpoint twice: the same model twice decodes as the model; vocabularies must match."""
  one, two = tmp_path / "one.json", tmp_path / "two.json"
  base = ["caption", f"--images={photo_dir}", "--beam_size=3", "--n_best=3", "--batch_size=4",
          "--no_progress"]
  assert cli.main(base + [f"--checkpoint={workdir}", f"--output={one}"]) == 1  # broken files
  step_dir = os.path.join(workdir, "checkpoints", "7")  # one step's folder names the step
  assert cli.main(base + [f"--checkpoint={workdir}", f"--checkpoint={step_dir}",
                          f"--output={two}"]) == 1
  assert "ensemble" in capsys.readouterr().err
  one, two = json.loads(one.read_text()), json.loads(two.read_text())
  assert [r["file_name"] for r in one] == [r["file_name"] for r in two] == GOOD
  for a, b in zip(one, two):
    assert [x["caption"] for x in a["n_best"]] == [x["caption"] for x in b["n_best"]]
    np.testing.assert_allclose([x["logprob"] for x in a["n_best"]],
                               [x["logprob"] for x in b["n_best"]], atol=1e-4)
  other = inference.random_model(_tiny_model_config(), vocab_lib.Vocabulary(WORDS[:-1] + ["zebra"]),
                                 IMAGE_SIZE, MAX_LENGTH, seed=4)
  other_dir = write_workdir(str(tmp_path / "other"), other)
  assert cli.main(base + [f"--checkpoint={workdir}", f"--checkpoint={other_dir}"]) == 2
  err = capsys.readouterr().err
  assert "vocabulary" in err and "other" in err


def test_no_empty_caption_from_an_end_favouring_model(model):
  """A model that would say END at once still says a word; min_length=0 lets it stop."""
  from captionjax import decode  # pylint: disable=g-import-not-at-top
  import copy  # pylint: disable=g-import-not-at-top
  eager = copy.copy(model)
  eager.params = copy.deepcopy(model.params)
  bias = np.array(eager.params["lm"]["logit"]["bias"])
  bias[0] += 30.0  # END far above every word
  eager.params["lm"]["logit"]["bias"] = bias
  images = np.stack([_pattern(IMAGE_SIZE, IMAGE_SIZE, s) for s in range(4)])
  # (Each decoder's min_length is tested in test_decode_options.py.)
  caps = inference.BatchCaptioner(eager, batch_size=4, beam_size=2)(images)
  assert all(len(c[0][0].split()) >= 1 for c in caps), caps
  caps = inference.BatchCaptioner(eager, batch_size=4, options=decode.DecodeOptions(
      beam_size=2, min_length=0))(images)
  assert all(c[0][0] == "" for c in caps), caps


@pytest.mark.parametrize("extra,message", [
    (["--images=.", "--n_best=3", "--beam_size=2"], "--n_best=3"),
    (["--images=.", "--sample", "--n_best=2", "--beam_size=2"], "--n_best"),
    (["--images=.", "--batch_size=0"], "--batch_size"),
    (["--images=.", "--beam_size=4", "--num_groups=3"], "--num_groups=3"),
    (["--images=.", "--sample", "--top_p=0"], "--top_p=0"),
    (["--images=.", "--sample", "--n_best=3", "--num_samples=2"], "--num_samples=2"),
    (["--images=.", "--min_length=-1"], "--min_length=-1"),
    (["--images=.", "--top_p=0.9"], "only with --sample"),
    (["--images=.", "--sample", "--num_groups=2"], "--num_groups=2"),
    (["--images=.", "--diversity_lambda=2"], "--num_groups > 1"),
    (["--images=/no/such/folder"], "/no/such/folder"),
    (["--camera=97"], "no camera /dev/video97"),
    ([], "one of --images"),
])
def test_usage_errors(workdir, capsys, extra, message):
  rc = cli.main(["caption", f"--checkpoint={workdir}", "--no_progress"] + extra)
  assert rc == 2
  assert message in capsys.readouterr().err


def test_bad_checkpoint_and_empty_folder(tmp_path, photo_dir, capsys):
  assert cli.main(["caption", f"--checkpoint={tmp_path}/nope", f"--images={photo_dir}"]) == 2
  assert "no such directory" in capsys.readouterr().err
  (tmp_path / "notrain").mkdir()
  assert cli.main(["caption", f"--checkpoint={tmp_path}/notrain", f"--images={photo_dir}"]) == 2
  assert "config.json" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.md").write_text("x")
  assert cli.main(["caption", "--checkpoint=x", f"--images={tmp_path}/empty"]) == 2
  assert "no image files" in capsys.readouterr().err


# ---------------------------------------------------------------- perplexity


def _split_data(model, n: int, seed: int):
  """An in-memory split: random images, 1 to 3 captions of varied lengths."""
  from captionjax import input_pipeline  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  caps = np.zeros((n, 3, MAX_LENGTH), np.int32)
  num = rng.integers(1, 4, n).astype(np.int32)
  for i in range(n):
    for j in range(num[i]):
      length = rng.integers(1, MAX_LENGTH + 1)
      caps[i, j, :length] = rng.integers(1, len(model.vocab) + 1, length)
  return input_pipeline.SplitData(images, caps, num, np.arange(n, dtype=np.int64),
                                  [f"{i}.png" for i in range(n)], [None] * n,
                                  IMAGE_SIZE, MAX_LENGTH)


def _perplexity_by_loop(model, data) -> float:
  """Independent reference: the model stepped token by token, numpy log-softmax."""
  from captionjax.models.captioner import Captioner  # pylint: disable=g-import-not-at-top
  from captionjax.models import build  # pylint: disable=g-import-not-at-top
  v = {"params": {k: model.params[k] for k in ("img_embed", "lm")}}
  nll, count = 0.0, 0
  for i in range(len(data)):
    feats = model.cnn.apply(build.cnn_variables(model.params["cnn"], model.batch_stats),
                            data.images[i:i + 1].astype(np.float32) / 255.0)
    for j in range(data.num_captions[i]):
      words = [int(w) for w in data.captions[i, j] if w > 0]
      carry = model.lm.apply(v, model.lm.apply(v, feats, method=Captioner.encode),
                             method=Captioner.decode_start)
      prev = 0  # START
      for target in words + [0]:  # the words, then END
        carry, logits = model.lm.apply(v, carry, np.array([prev], np.int32),
                                       method=Captioner.decode_step)
        x = np.asarray(logits[0], np.float64)
        logp = x - x.max() - math.log(np.exp(x - x.max()).sum())
        nll -= logp[target]
        count += 1
        prev = target
  return math.exp(nll / count)


def test_perplexity_equals_token_loop(model):
  data = _split_data(model, 7, seed=0)
  out = inference.perplexity(model, data, batch_size=3)  # 3 batches, the last padded
  assert out["captions"] == int(data.num_captions.sum())
  assert out["tokens"] == int((data.captions > 0).sum() + data.num_captions.sum())
  assert out["perplexity"] == pytest.approx(_perplexity_by_loop(model, data), rel=1e-5)
  assert out["cross_entropy"] == pytest.approx(math.log(out["perplexity"]))
  # Perplexity is above 1 and below a uniform guess over V+1 tokens at random weights x 2.
  assert 1.0 < out["perplexity"] < 2 * (len(model.vocab) + 1)


# ---------------------------------------------------------------- video


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
  """3 s at 10 fps, 48x32: red for 1.5 s, then a pattern."""
  ffmpeg = pytest.importorskip("imageio_ffmpeg")
  path = str(tmp_path_factory.mktemp("video") / "clip.mp4")
  w = ffmpeg.write_frames(path, (48, 32), fps=10, macro_block_size=1, quality=9)
  w.send(None)
  red = np.zeros((32, 48, 3), np.uint8)
  red[..., 0] = 255
  pattern = _pattern(32, 48, 7)
  for i in range(30):
    w.send((red if i < 15 else pattern).tobytes())
  w.close()
  return path


def test_video_timeline(tmp_path, video_file, workdir, model):
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  out, copy = tmp_path / "timeline.json", tmp_path / "captioned.mp4"
  rc = cli.main(["caption", f"--checkpoint={workdir}", f"--video={video_file}",
                 "--every_seconds=0.7", f"--output={out}", f"--video_output={copy}",
                 "--batch_size=2", "--no_progress"])
  assert rc == 0
  t = json.loads(out.read_text())
  assert t["size"] == [48, 32] and t["fps"] == pytest.approx(10)
  # Frames at or after 0, 0.7, 1.4, 2.1, 2.8 s at 10 fps.
  assert [f["frame"] for f in t["frames"]] == [0, 7, 14, 21, 28]
  assert [f["time"] for f in t["frames"]] == [0.0, 0.7, 1.4, 2.1, 2.8]
  # Each caption is the model's on that decoded frame, NeuralTalk2-cropped.
  frames = list(imageio_ffmpeg.read_frames(video_file))[1:]
  cap = inference.BatchCaptioner(model, batch_size=1, beam_size=2)
  for f in t["frames"]:
    frame = np.frombuffer(frames[f["frame"]], np.uint8).reshape(32, 48, 3)
    x = inference.resize(inference.square_crop(frame), IMAGE_SIZE)
    assert x.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    caption, logprob = cap(x[None])[0][0]
    assert f["caption"] == caption and f["logprob"] == pytest.approx(logprob, abs=1e-4)
  # The captioned copy: same frame count and size, the caption bar drawn at the bottom.
  reader = imageio_ffmpeg.read_frames(str(copy))
  meta = next(reader)
  out_frames = [np.frombuffer(b, np.uint8).reshape(32, 48, 3) for b in reader]
  assert tuple(meta["size"]) == (48, 32) and len(out_frames) == 30
  if any(f["caption"] for f in t["frames"]):
    bottom = out_frames[0][-3:].astype(int)
    assert bottom[..., 0].mean() < 150  # the red frame's bottom is now the black caption bar


def test_square_crop():
  x = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  np.testing.assert_array_equal(inference.square_crop(x), x[:, 1:5])
  np.testing.assert_array_equal(inference.square_crop(x.transpose(1, 0, 2)),
                                x.transpose(1, 0, 2)[1:5])
  np.testing.assert_array_equal(inference.center_crop(x, 2), x[1:3, 2:4])


# ---------------------------------------------------------------- a real training run


def test_trained_workdir_caption_and_perplexity(tmp_path, trained_workdir, shapes_dir, capsys):
  """The trainer's own checkpoint: caption its test images; perplexity matches its log."""
  from captionjax import input_pipeline  # pylint: disable=g-import-not-at-top
  data = input_pipeline.load_split(shapes_dir, "test")
  img_dir = tmp_path / "imgs"
  img_dir.mkdir()
  for i in range(6):  # the very pixels the trainer captioned, losslessly
    (img_dir / f"{i:02d}.png").write_bytes(_png(data.images[i]))
  out = tmp_path / "caps.json"
  assert cli.main(["caption", f"--checkpoint={trained_workdir}", f"--images={img_dir}",
                   f"--output={out}", "--no_progress"]) == 0
  results = json.loads(out.read_text())
  assert [r["file_name"] for r in results] == [f"{i:02d}.png" for i in range(6)]
  # The trainer's captions.json holds its beam-search captions of the same images.
  with open(os.path.join(trained_workdir, "captions.json"), encoding="utf-8") as f:
    trainer = {c["image_id"]: c for c in json.load(f)}
  for i, r in enumerate(results):
    ref = trainer[int(data.image_id[i])]
    assert r["caption"] == ref["caption"]
    assert r["logprob"] == pytest.approx(ref["logprob"], abs=1e-3)
  capsys.readouterr()
  assert cli.main(["perplexity", f"--checkpoint={trained_workdir}", "--split=val",
                   f"--data={shapes_dir}"]) == 0
  got = json.loads(capsys.readouterr().out)
  with open(os.path.join(trained_workdir, "train_log.jsonl"), encoding="utf-8") as f:
    log = [json.loads(line) for line in f]
  last_val = [r for r in log if r.get("phase") == "val"][-1]
  # shapes images have 5 captions, the trainer's validation scores 5 per image: same number.
  assert got["perplexity"] == pytest.approx(last_val["val_perplexity"], rel=1e-4)


def test_unreadable_video(tmp_path, workdir, capsys):
  pytest.importorskip("imageio_ffmpeg")
  bad = tmp_path / "clip.mp4"
  bad.write_text("not a video")
  rc = cli.main(["caption", f"--checkpoint={workdir}", f"--video={bad}",
                 f"--output={tmp_path}/t.json"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "clip.mp4" in err and "cannot read video" in err
  assert not (tmp_path / "t.json").exists()
