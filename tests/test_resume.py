"""Training you can trust: kill -9, a crash in the middle of a save, SIGTERM,
SIGINT, a diverging loss, bad workdirs, configs and checkpoints, --start_from.

The reference for exact resume is `trained_workdir` (conftest): the same tiny
run, uninterrupted. The interrupted runs are `captionjax train` subprocesses
sharing a JAX compilation cache, so only the first one pays for compiling.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import tiny_args

# Runs `captionjax train` and SIGKILLs the process when orbax is about to
# commit (rename) the checkpoint of step $KILL_AT_SAVE: a crash in the middle
# of a save, at its most complete point.
KILL_DURING_SAVE = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def killing_finalize(self, *args, **kwargs):
  if self.get_final().name == os.environ["KILL_AT_SAVE"]:
    print("test: SIGKILL while saving", self.get().name, file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
  return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
from captionjax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _train(workdir, shapes_dir, tmp_path, name, cache, script=None, env=None, **overrides):
  """Starts `captionjax train` on the tiny recipe (the same as trained_workdir's);
  output goes to tmp_path/NAME.log."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **(env or {}))
  prog = ["-c", script] if script else ["-m", "captionjax.cli"]
  log = open(tmp_path / f"{name}.log", "w", encoding="utf-8")  # pylint: disable=consider-using-with
  cmd = [sys.executable, *prog, "train", f"--workdir={workdir}", "--no_progress",
         *tiny_args(shapes_dir, extra_test_splits=(), **overrides)]
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), tmp_path / f"{name}.log"


def _text(path):
  return path.read_text(encoding="utf-8")


def _log(workdir):
  path = os.path.join(workdir, "train_log.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _final(workdir):
  """(last caption-phase training loss, last validation loss) of a run's log."""
  log = _log(workdir)
  train = [r for r in log if r.get("phase") == "caption" and "loss" in r]
  val = [r for r in log if r.get("phase") == "val"]
  return train[-1], val[-1]


def _checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _wait(proc, cond, timeout, what):
  t0 = time.time()
  while not cond():
    if proc.poll() is not None:
      raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.05)


def test_kill9_mid_save_then_sigterm_then_exact_resume(tmp_path, shapes_dir, trained_workdir,
                                                       jax_compilation_cache):
  workdir = str(tmp_path / "run")
  cache = jax_compilation_cache

  # 1. SIGKILL in the middle of saving step 20: checkpoint 10 must stay intact.
  proc, out = _train(workdir, shapes_dir, tmp_path, "1_kill9", cache, script=KILL_DURING_SAVE,
                     env={"KILL_AT_SAVE": "20"})
  assert proc.wait(timeout=600) == -signal.SIGKILL, _text(out)
  assert "SIGKILL while saving 20.orbax-checkpoint-tmp" in _text(out), _text(out)
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert any(n.startswith("20.orbax-checkpoint-tmp") for n in names), names
  assert _checkpoint_steps(workdir) == [10], names

  # 2. The same command resumes from step 10 and says so first; SIGTERM during
  # training makes it checkpoint and exit at once. (It logs every step, to be
  # signalled early, between two regular checkpoints; logging changes no numbers.)
  logged = len(_log(workdir))  # the killed run got further than its last checkpoint
  proc, out = _train(workdir, shapes_dir, tmp_path, "2_sigterm", cache, log_every_steps=1)
  _wait(proc, lambda: any("loss" in r for r in _log(workdir)[logged:]),
        600, "a caption step after the resume")
  proc.send_signal(signal.SIGTERM)
  t0 = time.time()
  rc = proc.wait(timeout=120)
  exit_seconds = time.time() - t0
  text = _text(out)
  first_lines = [l for l in text.splitlines() if l.strip()][:2]
  assert any("resuming from step 10" in l for l in first_lines), text
  assert rc == 128 + signal.SIGTERM, text
  assert exit_seconds < 60, exit_seconds  # "within seconds"; generous on a loaded CPU
  stopped = int(text.split("stopped by SIGTERM at step ")[1].split()[0])
  assert 10 < stopped < 30, text
  assert stopped in _checkpoint_steps(workdir)
  assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(
      os.path.join(workdir, "checkpoints"))), "the unfinished save of step 20 was not cleaned up"

  # 3. The same command resumes from there and ends exactly as the uninterrupted run.
  proc, out = _train(workdir, shapes_dir, tmp_path, "3_finish", cache)
  assert proc.wait(timeout=600) == 0, _text(out)
  first_lines = [l for l in _text(out).splitlines() if l.strip()][:2]
  assert any(f"resuming from step {stopped}" in l for l in first_lines), _text(out)
  (train, val), (ref_train, ref_val) = _final(workdir), _final(trained_workdir)
  assert train["step"] == ref_train["step"] == 30
  assert train["loss"] == pytest.approx(ref_train["loss"], rel=1e-5)
  assert val["val_loss"] == pytest.approx(ref_val["val_loss"], rel=1e-5)
  captions = json.load(open(os.path.join(workdir, "captions.json"), encoding="utf-8"))
  ref = json.load(open(os.path.join(trained_workdir, "captions.json"), encoding="utf-8"))
  assert [c["caption"] for c in captions] == [c["caption"] for c in ref]


def test_signal_handler_defers_in_the_loop_and_stops_elsewhere():
  from captionjax import checkpoints
  before = signal.getsignal(signal.SIGINT)  # a test worker process (xdist) may ignore SIGINT
  with checkpoints.StopOnSignal() as stop:
    stop.in_loop = True
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # handlers run between bytecodes
    assert stop.requested == signal.SIGINT  # recorded, nothing raised mid-step
    with pytest.raises(checkpoints.Preempted, match="SIGTERM"):
      os.kill(os.getpid(), signal.SIGTERM)  # a second signal stops at once
      time.sleep(1)
  with checkpoints.StopOnSignal() as stop:  # outside the loop: at once
    with pytest.raises(checkpoints.Preempted, match="SIGINT"):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is before  # restored


# ---------------------------------------------------------------- failures, in process


def _cli(capsys, *argv):
  from captionjax import cli
  rc = cli.main(["train", "--no_progress", *argv])
  err = capsys.readouterr().err
  return rc, [l for l in err.splitlines() if l.startswith("captionjax train: error")]


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, shapes_dir, capsys):
  from captionjax import checkpoints
  workdir = str(tmp_path / "run")
  rc, errors = _cli(capsys, f"--workdir={workdir}", *tiny_args(
      shapes_dir, cnn_pretrain_steps=0, learning_rate=1e3, grad_clip=1e6, learning_rate_decay_start=-1,
      log_every_steps=1, checkpoint_every_steps=1, eval_every_steps=1000, num_train_steps=40))
  assert rc == 1 and len(errors) == 1, errors
  assert "training diverged" in errors[0] and "last good checkpoint is" in errors[0], errors
  diverged_at = int(errors[0].split("step ")[1].split(":")[0])
  ckpt = checkpoints.Checkpointer(workdir, keep=10**6)
  steps = ckpt.all_steps()
  assert steps and steps[-1] < diverged_at, (steps, errors)
  assert errors[0].rstrip().endswith(ckpt.path(steps[-1])), errors
  for s in steps:
    state = ckpt.restore(s, None)
    assert all(np.isfinite(x).all() for x in _leaves(state["params"]))
  ckpt.close()
  losses = [r["loss"] for r in _log(workdir) if "loss" in r]
  assert not math.isfinite(losses[-1]) or losses[-1] > 20 * losses[0], losses


def _leaves(tree):
  import jax
  return jax.tree_util.tree_leaves(tree)


def test_clear_one_line_errors(tmp_path, shapes_dir, trained_workdir, capsys):
  # Bad input exits 2; a run that fails on its own (a full disk) exits 1.
  # An unknown config field.
  rc, errors = _cli(capsys, f"--workdir={tmp_path / 'a'}", "--config.no_such_field=1")
  assert rc == 2 and len(errors) == 1 and "no_such_field" in errors[0], errors
  # A missing data set.
  rc, errors = _cli(capsys, f"--workdir={tmp_path / 'b'}", "--config.dataset=/no/such/data")
  assert rc == 2 and len(errors) == 1 and "/no/such/data" in errors[0], errors
  # A workdir that cannot be created or written (under a regular file).
  (tmp_path / "file").write_text("x")
  rc, errors = _cli(capsys, f"--workdir={tmp_path / 'file' / 'run'}", *tiny_args(shapes_dir))
  assert rc == 2 and len(errors) == 1 and "not writable" in errors[0], errors
  # A full disk: /dev/full answers every write with ENOSPC.
  full = tmp_path / "full"
  full.mkdir()
  os.symlink("/dev/full", full / "config.json")
  rc, errors = _cli(capsys, f"--workdir={full}", *tiny_args(shapes_dir))
  assert rc == 1 and len(errors) == 1 and "no space left on device" in errors[0].lower(), errors
  # A checkpoint of an incompatible model: refused before anything is overwritten.
  other = tmp_path / "other"
  shutil.copytree(trained_workdir, other)
  before = (other / "config.json").read_text()
  rc, errors = _cli(capsys, f"--workdir={other}", *tiny_args(shapes_dir, model__rnn_size=64))
  assert rc == 2 and len(errors) == 1, errors
  assert "model.rnn_size=32" in errors[0] and "use a new --workdir" in errors[0], errors
  assert (other / "config.json").read_text() == before
  # --start_from a run that does not exist.
  rc, errors = _cli(capsys, f"--workdir={tmp_path / 'c'}", f"--start_from={tmp_path / 'none'}",
                    *tiny_args(shapes_dir))
  assert rc == 2 and len(errors) == 1 and "--start_from" in errors[0], errors


def test_start_from_another_run_fine_tunes_the_cnn(tmp_path, shapes_dir, trained_workdir, capsys):
  """--start_from takes the other run's model (not its step or optimizer) and
  goes on, here with CNN fine-tuning: its first loss is the trained model's."""
  workdir = str(tmp_path / "ft")
  rc, _ = _cli(capsys, f"--workdir={workdir}", f"--start_from={trained_workdir}", *tiny_args(
      shapes_dir, cached_features=False, finetune_cnn_after=0, num_train_steps=5,
      log_every_steps=1, eval_every_steps=1000, extra_test_splits=()))
  assert rc == 0
  log = _log(workdir)
  losses = [r["loss"] for r in log if r.get("phase") == "caption" and "loss" in r]
  assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]  # no pretraining, step 0
  ref = _final(trained_workdir)[0]["loss"]
  untrained = _first_loss(trained_workdir)
  assert losses[0] < 0.5 * (ref + untrained), (losses, ref, untrained)


def _first_loss(workdir):
  """The first caption loss of a run (an untrained language model)."""
  from captionjax import checkpoints
  ckpt = checkpoints.Checkpointer(workdir, keep=10**6)
  meta = ckpt.restore_meta(ckpt.latest_step())
  ckpt.close()
  return meta["first_loss"]["caption"]


def test_a_failed_save_is_one_oserror_naming_the_directory(tmp_path):
  """A full disk surfaces from orbax's background thread wrapped in other
  exceptions; the Checkpointer turns it into an OSError the CLI prints on one line."""
  import errno
  import jax.numpy as jnp
  from captionjax import checkpoints
  from captionjax import cli
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(1, {"x": jnp.arange(3.0)}, {"step": 1})
  ckpt.wait()

  def full(*args, **kwargs):
    del args, kwargs
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
      raise RuntimeError("async save failed") from e

  ckpt.manager.wait_until_finished = full
  with pytest.raises(OSError) as e:
    ckpt.wait()
  assert e.value.errno == errno.ENOSPC and e.value.filename == ckpt.directory
  message = cli.os_error_line(e.value, str(tmp_path))
  assert message.startswith(ckpt.directory) and "No space left on device" in message
  assert "\n" not in message
  del ckpt.manager.wait_until_finished
  ckpt.close()
  assert checkpoints.Checkpointer(str(tmp_path), keep=2).all_steps() == [1]
