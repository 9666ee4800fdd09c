"""Bad inputs and defects found in review: nothing clobbered, nothing lost, no traceback.

Each test names the defect it guards against; most run a subcommand in this
process through `cli.main` and check its exit status and its one-line error.
"""

import errno
import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from captionjax import checkpoints
from captionjax import cli
from captionjax import configs
from captionjax import files
from captionjax import inference
from captionjax import vocab as vocab_lib
from test_caption import _tiny_model_config, write_workdir

WORDS = ["a", "red", "blue", "circle", "square"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  m = inference.random_model(_tiny_model_config(), vocab_lib.Vocabulary(WORDS), 32, 5, seed=1)
  return write_workdir(str(tmp_path_factory.mktemp("run")), m)


@pytest.fixture()
def photos(tmp_path):
  d = tmp_path / "photos"
  d.mkdir()
  for i in range(3):
    Image.new("RGB", (40, 30), (60 * i, 90, 200)).save(d / f"p{i}.png")
  return d


def _errors(capsys):
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  return [line for line in err.splitlines() if "error:" in line]


# ---------------------------------------------------------------- 1. outputs


def test_output_that_is_an_input_image_is_refused(workdir, photos, capsys):
  image = photos / "p0.png"
  before = image.read_bytes()
  rc = cli.main(["caption", f"--checkpoint={workdir}", f"--images={photos}",
                 f"--output={image}", "--no_progress"])
  assert rc == 2 and image.read_bytes() == before
  errors = _errors(capsys)
  assert len(errors) == 1 and "input file" in errors[0] and str(image) in errors[0]


def test_output_through_a_symlink_keeps_the_link(workdir, photos, tmp_path):
  target, link = tmp_path / "real.json", tmp_path / "link.json"
  target.write_text("old")
  link.symlink_to(target)
  assert cli.main(["caption", f"--checkpoint={workdir}", f"--images={photos}",
                   f"--output={link}", "--no_progress"]) == 0
  assert link.is_symlink() and len(json.loads(target.read_text())) == 3


def test_output_to_a_device_writes_through(tmp_path):
  files.write_json(os.devnull, {"a": 1})
  assert stat.S_ISCHR(os.stat(os.devnull).st_mode)  # still the device, not a file
  with pytest.raises(OSError) as e:  # /dev/full: the error names the device
    files.write_json("/dev/full", {"a": 1})
  assert e.value.errno == errno.ENOSPC and stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_json_with_undecodable_file_names(tmp_path):
  name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: a lone surrogate in Python
  path = tmp_path / "out.json"
  files.write_json(str(path), [{"file_name": name, "caption": "é"}])
  back = json.loads(path.read_text(encoding="utf-8"))
  assert back[0]["file_name"] == name and back[0]["caption"] == "é"
  assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left


def test_ctrl_c_keeps_the_captions_done(workdir, photos, tmp_path, monkeypatch, capsys):
  real = inference.caption_files

  def interrupted(*args, **kwargs):
    for n, item in enumerate(real(*args, **kwargs)):
      if n == 2:
        raise KeyboardInterrupt
      yield item

  monkeypatch.setattr(inference, "caption_files", interrupted)
  out = tmp_path / "out.json"
  rc = cli.main(["caption", f"--checkpoint={workdir}", f"--images={photos}",
                 f"--output={out}", "--no_progress", "--batch_size=1"])
  assert rc == 130
  assert [r["file_name"] for r in json.loads(out.read_text())] == ["p0.png", "p1.png"]
  assert "interrupted after 2 of 3 images" in capsys.readouterr().err


# ---------------------------------------------------------------- 4. vocabulary


def test_a_swapped_vocabulary_is_refused(workdir, tmp_path):
  import shutil
  other = tmp_path / "swapped"
  shutil.copytree(workdir, other)
  ckpt = checkpoints.Checkpointer(str(other), keep=10)
  step = ckpt.latest_step()
  meta = ckpt.restore_meta(step)
  ckpt.manager.close()
  # Give the checkpoint its vocabulary's digest, as `captionjax train` records it.
  import orbax.checkpoint as ocp
  ckpt = checkpoints.Checkpointer(str(other), keep=10)
  state = ckpt.restore(step, None)
  ckpt.manager.delete(step)
  ckpt.manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave({**meta, "vocab_digest": checkpoints.vocab_digest(
          vocab_lib.Vocabulary.load(str(other / "vocab.json")).words)})))
  ckpt.close()
  words = inference.load_workdir(str(other)).vocab.words
  swapped = list(words)
  swapped[1], swapped[2] = swapped[2], swapped[1]
  vocab_lib.Vocabulary(swapped).save(str(other / "vocab.json"))
  with pytest.raises(inference.CheckpointError, match="not the vocabulary"):
    inference.load_workdir(str(other))


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("override,field", [
    ("batch_size=0", "batch_size"), ("model.rnn_size=-1", "model.rnn_size"),
    ("seq_per_img=0", "seq_per_img"), ("keep_checkpoints=0", "keep_checkpoints"),
    ("num_train_steps=-5", "num_train_steps"), ("beam_size=0", "beam_size"),
    ("batch_size=True", "batch_size"), ("learning_rate=nan", "learning_rate"),
    ("model.drop_prob_lm=1.5", "model.drop_prob_lm"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, capsys, override, field):
  rc = cli.main(["train", f"--workdir={tmp_path}/w", f"--config.{override}"])
  errors = _errors(capsys)
  assert rc == 2 and len(errors) == 1 and field in errors[0], errors
  assert not os.path.exists(tmp_path / "w" / "checkpoints")  # failed before any work


def test_bad_config_files(tmp_path, capsys):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  wrong = tmp_path / "wrong.py"
  wrong.write_text("def get_config():\n  return {'batch_size': 3}\n")
  for path, words in ((broken, "syntax error"), (wrong, "ConfigDict")):
    rc = cli.main(["train", f"--workdir={tmp_path}/w", f"--config={path}"])
    errors = _errors(capsys)
    assert rc == 2 and len(errors) == 1 and words in errors[0] and str(path) in errors[0]


def test_a_folder_named_like_a_config_does_not_shadow_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.mkdir("default")
  assert configs.load_config("default").model.cnn == "small_vgg"
  with pytest.raises(configs.ConfigError, match="a directory"):
    configs.load_config("./default")


def test_debug_shows_the_traceback(tmp_path, capsys):
  assert cli.run_command("x", lambda: (_ for _ in ()).throw(ValueError("bad thing"))) == 2
  assert capsys.readouterr().err == "x: error: bad thing\n"
  with pytest.raises(ValueError):
    cli.run_command("x", lambda: (_ for _ in ()).throw(ValueError("bad thing")), debug=True)


# ---------------------------------------------------------------- 6. signals


def test_a_signal_during_restore_is_not_a_damaged_checkpoint(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1, {"x": np.arange(3.0)}, {"step": 1})
  ckpt.wait()

  def stopped(*args, **kwargs):
    raise checkpoints.Preempted(15)

  ckpt.restore = stopped
  with pytest.raises(checkpoints.Preempted):
    checkpoints.restore_state(ckpt, 1, {"x": np.zeros(3)})
  ckpt.close()


# ---------------------------------------------------------------- 7. learning rate


def test_neuraltalk2_learning_rate_schedule():
  from captionjax import optim
  c = configs.load_config("neuraltalk2")
  start, every, lr = c.learning_rate_decay_start, c.learning_rate_decay_every, c.learning_rate
  _, schedule = optim.lm_optimizer(c)
  for step in (0, start, start + every // 2, start + every, start + 2 * every):
    expected = lr * (0.5 ** ((step - start) / every) if step > start else 1.0)
    assert float(schedule(np.int32(step))) == pytest.approx(expected, rel=1e-6)
  # The CNN's rate decays too, counted in caption steps: a CNN fine-tuned from
  # step start + every takes its first Adam step (size ~ its rate) at x0.5.
  c.finetune_cnn_after = start + every
  tx = optim.cnn_optimizer(c)
  params = {"w": np.ones(3, np.float32)}
  updates, _ = tx.update({"w": np.array([0.01, -0.02, 0.03], np.float32)}, tx.init(params), params)
  np.testing.assert_allclose(np.abs(updates["w"]), c.cnn_learning_rate * 0.5, rtol=1e-3)
  # The default recipe keeps its step schedule: x0.5 at the start, x0.25 `every` later.
  d = configs.load_config("default")
  _, schedule = optim.lm_optimizer(d)
  s, e = d.learning_rate_decay_start, d.learning_rate_decay_every
  assert float(schedule(np.int32(s - 1))) == pytest.approx(d.learning_rate)
  assert float(schedule(np.int32(s))) == pytest.approx(d.learning_rate * 0.5)
  assert float(schedule(np.int32(s + e))) == pytest.approx(d.learning_rate * 0.25)


# ---------------------------------------------------------------- 5. crop_size


def test_evaluation_crops_as_the_config_says(shapes_dir):
  from captionjax import evaluation, input_pipeline
  data = input_pipeline.load_split(shapes_dir, "val")
  seen = []

  class Recorder:
    def apply(self, variables, x, train=False):
      seen.append(x.shape)
      return x.reshape(x.shape[0], -1)[:, :4]

  evaluation.compute_features(Recorder(), {}, {}, {"val": data}, 5, np.asarray, crop_size=48)
  assert seen and all(s[1:3] == (48, 48) for s in seen)


# ---------------------------------------------------------------- 8. stale data


def test_shapes_are_made_again_for_other_settings(tmp_path):
  from captionjax import records, shapes
  root = str(tmp_path / "s")
  out = shapes.prepare(root, {"train": 6, "val": 2, "test": 2}, image_size=32, seed=0,
                       num_workers=1)
  assert records.load_info(out)["num_images"] == 10
  out = shapes.prepare(root, {"train": 8, "val": 2, "test": 2}, image_size=32, seed=0,
                       num_workers=1)
  assert records.load_info(out)["num_images"] == 12


def test_make_shapes_rejects_bad_sizes(tmp_path, capsys):
  assert cli.main(["make-shapes", f"--output_dir={tmp_path}", "--image_size=10"]) == 2
  assert cli.main(["make-shapes", f"--output_dir={tmp_path}", "--num_train=-5"]) == 2
  errors = _errors(capsys)
  assert len(errors) == 2 and "16..512" in errors[0] and "--num_train" in errors[1]


def test_features_error_names_the_weights_folder(tmp_path, photos, capsys):
  rc = cli.main(["features", f"--weights={tmp_path}", f"--images={photos}",
                 f"--output={tmp_path}/f.npy"])
  errors = _errors(capsys)
  assert rc == 2 and len(errors) == 1, errors
  assert f"--output={tmp_path}" in errors[0] and "{weights_dir}" not in errors[0]


def test_a_damaged_test_split_fails_before_training(shapes_dir, tmp_path, capsys):
  import shutil
  from captionjax import records
  from conftest import tiny_args
  data = tmp_path / "data"
  shutil.copytree(shapes_dir, data)
  shard = records.split_files(str(data), "test")[0]
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 50)
  rc = cli.main(["train", f"--workdir={tmp_path}/w", "--no_progress",
                 *tiny_args(str(data))])
  errors = _errors(capsys)
  assert rc == 2 and len(errors) == 1 and "'test'" in errors[0] and "damaged" in errors[0]
  assert not os.listdir(tmp_path / "w" / "checkpoints")  # before any training step


def test_stdout_on_a_full_disk(tmp_path):
  import subprocess
  import sys
  ann = tmp_path / "a.json"
  ann.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a dog"}]}))
  res = tmp_path / "r.json"
  res.write_text(json.dumps([{"image_id": 1, "caption": "a dog"}]))
  with open("/dev/full", "w") as full:
    proc = subprocess.run([sys.executable, "-m", "captionjax.cli", "evaluate",
                           f"--annotations={ann}", f"--results={res}", "--metrics=bleu"],
                          stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert "cannot write to standard output" in proc.stderr


@pytest.mark.parametrize("flags,words", [
    (["--length_penalty=nan"], "--length_penalty=nan"),
    (["--sample", "--temperature=nan"], "--temperature=nan"),
    (["--temperature=0.5"], "only with --sample"),
])
def test_caption_flags_that_cannot_work(workdir, photos, capsys, flags, words):
  rc = cli.main(["caption", f"--checkpoint={workdir}", f"--images={photos}", *flags])
  errors = _errors(capsys)
  assert rc == 2 and len(errors) == 1 and words in errors[0], errors


def test_caption_video_flags_that_would_be_ignored(workdir, tmp_path, capsys):
  video = tmp_path / "v.mp4"
  video.write_bytes(b"x")
  rc = cli.main(["caption", f"--checkpoint={workdir}", f"--video={video}",
                 f"--html={tmp_path}/g", "--every_seconds=nan"])
  errors = _errors(capsys)
  assert rc == 2 and len(errors) == 1 and "--every_seconds=nan" in errors[0], errors
  rc = cli.main(["caption", f"--checkpoint={workdir}", f"--video={video}", f"--html={tmp_path}/g"])
  errors = _errors(capsys)
  assert rc == 2 and "--html: only with --images" in errors[0], errors


def test_a_damaged_dataset_info_names_the_file(tmp_path):
  from captionjax import records
  (tmp_path / records.INFO_FILE).write_bytes(b'{"format_version": \xff')
  with pytest.raises(ValueError, match=str(tmp_path / records.INFO_FILE)):
    records.load_info(str(tmp_path))


def test_a_truncated_checkpoint_is_one_line(workdir, photos, tmp_path):
  """Orbax fails cleanly; TensorStore's late callbacks print no tracebacks."""
  import shutil
  import subprocess
  import sys
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  for p in (run / "checkpoints").rglob("*"):  # every data file of the state, cut short
    if p.is_file() and "d" in p.parts and p.stat().st_size > 64:
      os.truncate(p, p.stat().st_size // 2)
  proc = subprocess.run([sys.executable, "-m", "captionjax.cli", "caption", f"--checkpoint={run}",
                         f"--images={photos}", "--no_progress"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.count("error:") == 1 and "cannot restore" in proc.stderr, proc.stderr
