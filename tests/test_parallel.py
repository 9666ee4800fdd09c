"""Many devices and processes (captionjax/parallel.py) train the one-device model.

Runs of `captionjax train` on 4 and 2 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) and as 2 local processes
joined by jax.distributed are subprocesses; the one-device reference runs in
this process, while they run. The tiny recipe, shortened: 2 CNN pretraining
steps, then 4 caption steps, a checkpoint at step 3.
"""

import ast
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_args

RTOL = 1e-4  # the bound on the relative loss difference
SHORT = dict(cnn_pretrain_steps=2, num_train_steps=4, checkpoint_every_steps=3,
             log_every_steps=1, eval_every_steps=100, extra_test_splits=())
TIMEOUT = 600


def _env(devices: int, cache: str) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="3")


def _start(workdir, shapes_dir, cache, devices, *flags, name="run", **overrides):
  """A `captionjax train` subprocess on `devices` fake CPU devices; (Popen, log path)."""
  cmd = ["train", f"--workdir={workdir}", "--no_progress",
         *tiny_args(shapes_dir, **{**SHORT, **overrides}), *flags]
  return _popen(cmd, f"{workdir}.{name}.log", _env(devices, cache))


def _popen(args, log, env):
  with open(log, "w", encoding="utf-8") as out:
    return subprocess.Popen([sys.executable, "-m", "captionjax.cli", *args], stdout=out,
                            stderr=subprocess.STDOUT, env=env), log


def _finish(proc, log, rc=0) -> str:
  try:
    proc.wait(TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
  with open(log, encoding="utf-8") as f:
    text = f.read()
  assert proc.returncode == rc, text[-3000:]
  return text


def _in_process(workdir, shapes_dir, **overrides):
  from captionjax import cli
  assert cli.main(["train", f"--workdir={workdir}", "--no_progress",
                   *tiny_args(shapes_dir, **{**SHORT, **overrides})]) == 0


def _log(workdir) -> list:
  with open(os.path.join(workdir, "train_log.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _losses(workdir) -> dict:
  """step -> training loss; each step logged once."""
  steps = [r["step"] for r in _log(workdir) if "loss" in r]
  assert len(steps) == len(set(steps)), f"steps logged twice in {workdir}: {steps}"
  return {r["step"]: r["loss"] for r in _log(workdir) if "loss" in r}


def _assert_same_losses(run, reference, steps=None):
  a, b = _losses(run), _losses(reference)
  steps = sorted(b) if steps is None else steps
  assert set(steps) <= set(a), (sorted(a), steps)
  np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=RTOL)


def _back_to_step(src, dst, step):
  """A copy of workdir `src` as it was at checkpoint `step` (later ones removed)."""
  shutil.copytree(src, dst)
  ckpts = os.path.join(dst, "checkpoints")
  for name in os.listdir(ckpts):
    if not name.isdigit() or int(name) > step:
      (shutil.rmtree if os.path.isdir(os.path.join(ckpts, name)) else os.remove)(
          os.path.join(ckpts, name))
  records = [r for r in _log(dst) if r["step"] <= step and r.get("phase") != "test"]
  with open(os.path.join(dst, "train_log.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def test_four_devices_then_restored_on_one_and_two(tmp_path, shapes_dir, jax_compilation_cache):
  one, four = str(tmp_path / "one"), str(tmp_path / "four")
  proc = _start(four, shapes_dir, jax_compilation_cache, 4)
  _in_process(one, shapes_dir)  # the reference, meanwhile
  _finish(*proc)
  _assert_same_losses(four, one)
  assert sorted(_losses(one)) == list(range(1, 7))

  # The 4-device checkpoint of step 3, continued on 2 devices (the large arrays
  # split over them: model_parallel=2) and on 1: the uninterrupted run's losses.
  _back_to_step(four, str(tmp_path / "on_two"), 3)
  _back_to_step(four, str(tmp_path / "on_one"), 3)
  proc = _start(str(tmp_path / "on_two"), shapes_dir, jax_compilation_cache, 2,
                model_parallel=2)
  # `captionjax caption` from the 4-device checkpoint, of 8 images in batches of 4:
  # on 4 devices (one image each) and on this process's one CPU, the same captions.
  caption = ["caption", f"--checkpoint={four}", f"--images={shapes_dir}/../images",
             "--num_images=8", "--batch_size=4", "--no_progress"]
  captioning = _popen([*caption, f"--output={tmp_path / 'four.json'}"],
                      str(tmp_path / "caption.log"), _env(4, jax_compilation_cache))
  _in_process(str(tmp_path / "on_one"), shapes_dir)
  text = _finish(*proc)
  assert "resumed at step 3 of 6" in text
  _finish(*captioning)
  from captionjax import cli
  assert cli.main([*caption, f"--output={tmp_path / 'one.json'}"]) == 0
  with open(tmp_path / "four.json", encoding="utf-8") as f:
    with open(tmp_path / "one.json", encoding="utf-8") as g:
      a, b = json.load(f), json.load(g)
  assert [x["caption"] for x in a] == [x["caption"] for x in b] and len(a) == 8
  np.testing.assert_allclose([x["logprob"] for x in a], [x["logprob"] for x in b], rtol=1e-3)
  for run in ("on_one", "on_two"):
    _assert_same_losses(str(tmp_path / run), one, steps=[4, 5, 6])
    assert _losses(str(tmp_path / run)).keys() == _losses(one).keys()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_resume_a_two_device_run_and_match_it(tmp_path, shapes_dir,
                                                            jax_compilation_cache):
  two, procs = str(tmp_path / "two_devices"), str(tmp_path / "two_processes")
  bad = _start(str(tmp_path / "bad"), shapes_dir, jax_compilation_cache, 2, batch_size=7)
  _finish(*_start(two, shapes_dir, jax_compilation_cache, 2))
  text = _finish(*bad, rc=2).strip().splitlines()
  assert "config.batch_size=7 is not divisible by the 2 devices" in text[-1], text[-3:]
  assert not os.path.exists(str(tmp_path / "bad" / "checkpoints"))  # before anything started

  # Its checkpoint of step 3, continued by 2 processes of 1 device each.
  _back_to_step(two, procs, 3)
  flags = [f"--coordinator=localhost:{_free_port()}", "--num_processes=2"]
  runs = [_start(procs, shapes_dir, jax_compilation_cache, 1, *flags, f"--process_id={i}",
                 name=f"p{i}") for i in range(2)]
  out = [_finish(*r) for r in runs]
  assert all("resumed at step 3 of 6" in o for o in out)
  _assert_same_losses(procs, two)
  assert "process 1 of 2" in out[1] and "step=6 phase=test" in out[0]
  assert "step=" not in out[1]  # process 1 neither logs nor echoes
  assert sorted(os.listdir(os.path.join(procs, "checkpoints"))) == ["3", "6", "best.json"]
  with open(os.path.join(procs, "scores.json"), encoding="utf-8") as f:
    with open(os.path.join(two, "scores.json"), encoding="utf-8") as g:
      a, b = json.load(f), json.load(g)
  assert a["CIDEr"] == pytest.approx(b["CIDEr"], abs=1e-6)  # every test image, once


@pytest.mark.parametrize("flags, message", [
    (["--coordinator=localhost:1"], "go together"),
    (["--coordinator=localhost", "--num_processes=2", "--process_id=0"], "HOST:PORT"),
    (["--coordinator=localhost:1", "--num_processes=2", "--process_id=2"], "must be in 0..1"),
])
def test_bad_distributed_flags_are_one_line(tmp_path, shapes_dir, capsys, flags, message):
  from captionjax import cli
  assert cli.main(["train", f"--workdir={tmp_path / 'w'}", *tiny_args(shapes_dir), *flags]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0], err


SPLIT_CHECK = """
import jax, numpy as np
from captionjax import parallel
place = parallel.Placement.create(model_parallel=2)
state = place.state({"big": np.ones((300, 256), np.float32), "small": np.ones((8, 4), np.float32),
                     "odd": np.ones((300, 257), np.float32), "vector": np.ones(70000, np.float32)})
print({k: [tuple(s.data.shape) for s in v.addressable_shards] for k, v in state.items()})
print(float(parallel.to_host(state["big"]).sum()))
"""


def test_model_parallel_splits_the_large_2d_arrays():
  out = subprocess.run([sys.executable, "-c", SPLIT_CHECK], env=_env(2, ""), text=True,
                       capture_output=True, timeout=TIMEOUT, check=True).stdout.splitlines()
  shards = ast.literal_eval(out[0])
  assert shards == {"big": [(300, 128), (300, 128)], "small": [(8, 4), (8, 4)],
                    "odd": [(300, 257), (300, 257)], "vector": [(70000,), (70000,)]}
  assert float(out[1]) == 300 * 256  # gathered whole


def test_flags_reach_jax_distributed(monkeypatch):
  """--coordinator/--num_processes/--process_id go to jax.distributed.initialize as
  they are; --distributed alone calls it with nothing (the cluster's environment)."""
  import jax
  from captionjax import parallel
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  parallel.initialize()  # a single process: nothing started
  parallel.initialize("10.0.0.1:1234", 4, 3)
  parallel.initialize(auto=True)
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                    "process_id": 3}, {}]
