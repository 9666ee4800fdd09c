"""Orbax checkpoints of a training run: WORKDIR/checkpoints/<step>/{state,meta}.

A checkpoint holds the train state (parameters, optimizer state, step, batch
statistics) as the `state` item and a JSON `meta` item (step, phase, input
position, RNG key, vocabulary, config). Orbax writes each step into
`<step>.orbax-checkpoint-tmp...` and renames it when complete, so a crash in
the middle of a save leaves every earlier checkpoint intact; the unfinished
directory is ignored (and removed when the run resumes).

Retention: the latest `keep` checkpoints, plus the best by validation score
(`best.json` beside them: step -> score, higher is better), as NeuralTalk2
keeps its best model.
"""

import hashlib
import json
import os

import jax
import numpy as np

BEST_FILE = "best.json"
# The training phases a checkpoint can be of (its meta "phase").
PHASE_PRETRAIN, PHASE_CAPTION, PHASE_SCST = "cnn_pretrain", "caption", "scst"
PHASE_RANKING = "ranking"  # phase 2 of a ranking config (the alignment model)


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; str(e) is one line naming it."""


class RestoreError(CheckpointError):
  """Orbax failed to read a checkpoint: the command ends at once (cli.entry),
  TensorStore's reads of it still outstanding."""
  exit_at_once = True


def vocab_digest(words) -> str:
  """A short digest of the vocabulary's words, in order."""
  return hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()[:16]


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _flatten(d: dict, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def config_differences(old: dict, new: dict, prefix: str = "") -> list:
  """Fields that differ between two config dicts: [(name, old, new)]."""
  a, b = dict(_flatten(old, prefix)), dict(_flatten(new, prefix))
  norm = lambda v: list(v) if isinstance(v, tuple) else v  # JSON turns tuples into lists
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if norm(a.get(k)) != norm(b.get(k))]


def check_compatible(meta: dict, config, vocab, where: str, cnn_only: bool = False) -> list:
  """Raises CheckpointError if the checkpoint `meta` cannot serve `config` and `vocab`.

  The model's architecture (with `cnn_only`, the CNN's) and the vocabulary
  must match; other differences (learning rate, number of steps, ...) are
  returned as [(field, old, new)].
  """
  if "vocab_size" in meta and meta["vocab_size"] != len(vocab):
    raise CheckpointError(f"{where}: checkpoint has a vocabulary of {meta['vocab_size']} words, "
                          f"the data set {len(vocab)}: use a new --workdir")
  digest = meta.get("vocab_digest")
  if digest is not None and digest != vocab_digest(vocab.words):
    raise CheckpointError(f"{where}: checkpoint was trained on a different vocabulary than "
                          "the data set's (same size, other words): use a new --workdir")
  old = meta.get("config")
  if not old:
    return []
  diffs = config_differences(old, config.to_dict())
  model = [d for d in diffs if d[0].startswith("model.cnn" if cnn_only else "model.")
           and d[0] != "model.cnn_weights"]
  if model:
    k, a, b = model[0]
    raise CheckpointError(f"{where}: checkpoint has config.{k}={a!r}, this config {b!r} "
                          "(an incompatible model): use a new --workdir or the same config")
  return diffs


class Checkpointer:
  """Orbax checkpoints under WORKDIR/checkpoints/<step>/ with a JSON `meta` item.

  Opening one never deletes anything; `save` prunes to the latest `keep`
  plus the best scored. Saves are asynchronous: the state is copied to host
  memory, then written in the background while training goes on.
  """

  def __init__(self, workdir: str, keep: int, async_save: bool = True, cleanup: bool = False):
    """`cleanup`: remove unfinished saves left by a crash (only the run that
    writes here may: a reader could otherwise delete a save in progress)."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.keep = keep
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=cleanup))

  def all_steps(self) -> list:
    return sorted(self.manager.all_steps())

  def latest_step(self):
    return self.manager.latest_step()

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # ---- best by validation score

  def _best_path(self):
    return os.path.join(self.directory, BEST_FILE)

  def scores(self) -> dict:
    """step -> validation score (higher is better) of the scored checkpoints."""
    try:
      with open(self._best_path(), encoding="utf-8") as f:
        return {int(k): float(v) for k, v in json.load(f)["scores"].items()}
    except (OSError, ValueError, KeyError):
      return {}

  def record_score(self, step: int, score: float, name: str) -> None:
    """Records the validation score of the checkpoint at `step` (written atomically)."""
    scores = self.scores()
    scores[int(step)] = float(score)
    tmp = self._best_path() + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump({"metric": name, "scores": {str(k): v for k, v in sorted(scores.items())}}, f)
    os.replace(tmp, self._best_path())

  def best_step(self):
    """The existing checkpoint with the highest recorded score (None if none scored)."""
    steps = set(self.all_steps())
    scored = {s: v for s, v in self.scores().items() if s in steps and np.isfinite(v)}
    return max(scored, key=lambda s: (scored[s], s)) if scored else None

  def _prune(self) -> None:
    steps = self.all_steps()
    keep = set(steps[-self.keep:]) if self.keep > 0 else set()
    best = self.best_step()
    if best is not None:
      keep.add(best)
    for s in steps:
      if s not in keep:
        self.manager.delete(s)

  # ---- save and restore

  def save(self, step: int, state, meta: dict, host_copy: bool = False) -> None:
    """Starts saving `state` and `meta` as checkpoint `step`; prunes old ones.

    `host_copy`: `state` is already a numpy copy of its own (not a view of
    device buffers the next step may donate), so it is not copied again.
    """
    ocp = self._ocp
    self.wait()  # the previous save is complete: only then may older ones go
    host = state if host_copy else jax.tree_util.tree_map(np.array, jax.device_get(state))
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e, step) from None
    self._prune()

  def wait(self) -> None:
    """Blocks until the pending save is on disk (OSError if it failed, e.g. a full disk)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (raised from orbax's thread)
      raise self._save_error(e, None) from None

  def _save_error(self, e: BaseException, step) -> Exception:
    """An OSError naming the directory (or a one-line CheckpointError) for a failed save."""
    cause, seen = e, set()
    while cause is not None and id(cause) not in seen:
      seen.add(id(cause))
      if isinstance(cause, OSError) and cause.errno is not None:
        return OSError(cause.errno, f"{cause.strerror} (saving a checkpoint)",
                       cause.filename or self.directory)
      cause = cause.__cause__ or cause.__context__
    where = self.path(step) if step is not None else self.directory
    return CheckpointError(f"{where}: saving the checkpoint failed ({_first_line(e)})")

  def restore_meta(self, step: int) -> dict:
    ocp = self._ocp
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, target):
    """The `state` of checkpoint `step`, shaped as `target` (None: as saved, numpy)."""
    ocp = self._ocp
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ---------------------------------------------------------------- a run's checkpoints


def read_meta(ckpt: Checkpointer, step: int) -> dict:
  """The `meta` item of checkpoint `step` (CheckpointError, one line, if unreadable)."""
  try:
    return ckpt.restore_meta(step)
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
    raise CheckpointError(f"{ckpt.path(step)}: unreadable checkpoint ({_first_line(e)})") from None


def restore_state(ckpt: Checkpointer, step: int, target, older_target=None):
  """The train state of checkpoint `step`, shaped as `target` (CheckpointError if not).

  `older_target`: the shape of the same state as an older version saved it,
  tried when `target` does not fit.
  """
  try:
    return ckpt.restore(step, target)
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
    if older_target is not None:
      return restore_state(ckpt, step, older_target)
    raise RestoreError(f"{ckpt.path(step)}: cannot restore ({_first_line(e)}): "
                          "use a new --workdir or delete that step") from None


def load_start_from(other: str, config, vocab, params, batch_stats, say):
  """(params, batch_stats) with what another run's latest checkpoint has of them.

  The model and vocabulary must match; the optimizer state and the step are
  not taken (NeuralTalk2's -start_from). A run of the other model kind (a
  captioner for a ranking config, or the reverse) gives its CNN alone, which
  must match.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(other, "checkpoints")):
    raise CheckpointError(f"--start_from={other}: no checkpoints/ directory there")
  src = Checkpointer(other, keep=10**6)  # opened read-only: saves nothing, prunes nothing
  try:
    step = src.latest_step()
    if step is None:
      raise CheckpointError(f"--start_from={other}: no checkpoint saved there yet")
    meta = read_meta(src, step)
    kind = lambda c: (c.get("model") or {}).get("kind", "captioner")
    check_compatible(meta, config, vocab, f"--start_from={src.path(step)}",
                     cnn_only=kind(meta.get("config") or {}) != kind(config.to_dict()))
    try:
      saved = src.restore(step, None)  # as saved: numpy arrays
    except Exception as e:  # pylint: disable=broad-except
      raise RestoreError(f"--start_from={src.path(step)}: cannot restore "
                            f"({_first_line(e)})") from None
  finally:
    src.manager.close()
  params = dict(params)
  loaded = [k for k in params if k in saved["params"]]
  for k in loaded:
    params[k] = jax.tree_util.tree_map(lambda a, b: jnp.asarray(b, a.dtype),
                                       params[k], saved["params"][k])
  if saved.get("batch_stats"):
    batch_stats = jax.tree_util.tree_map(lambda a, b: jnp.asarray(b, a.dtype),
                                         batch_stats, saved["batch_stats"])
  say(f"start_from: {', '.join(loaded)} from {src.path(step)} ({meta.get('phase')} phase, "
      f"step {step}); optimizer and step start afresh")
  return params, batch_stats


def check_free_space(workdir: str, state, factor: float = 2.0) -> None:
  """OSError(ENOSPC) if the workdir cannot hold `factor` checkpoints of `state`."""
  import errno  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  need = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state)) * factor
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise OSError(errno.ENOSPC, f"no space left on device: {free / 2**20:.0f} MiB free, "
                  f"{factor:g} checkpoints need about {need / 2**20:.0f} MiB", workdir)


def check_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that a file can be written there (OSError if not)."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OSError(e.errno, f"--workdir is not writable ({e.strerror})", workdir) from None


# ---------------------------------------------------------------- preemption


class Preempted(BaseException):
  """SIGTERM or SIGINT stopped the run; str(e) says where it can resume.

  A BaseException, as KeyboardInterrupt is: the broad `except Exception`
  around restores and saves must not take a signal for a damaged checkpoint.
  """

  def __init__(self, signum: int, message: str = "", saved: bool = False):
    import signal  # pylint: disable=g-import-not-at-top
    self.signum = signum
    self.saved = saved  # a checkpoint of the current step was written
    name = signal.Signals(signum).name
    super().__init__(message or f"stopped by {name}")


class StopOnSignal:
  """Turns SIGTERM and SIGINT into a request to checkpoint and stop.

  While `in_loop` is set (the training loop, which polls `requested` after
  each step), a signal only sets `requested`; elsewhere, or at a second
  signal, it raises Preempted at once. Handlers are installed only in the
  main thread, and the previous ones are restored on exit.
  """

  SIGNALS = ("SIGTERM", "SIGINT")

  def __init__(self):
    self.requested = None  # the signal number, once one arrived
    self.in_loop = False
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested is not None or not self.in_loop:
      raise Preempted(signum)
    self.requested = signum

  def __enter__(self):
    import signal  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    if threading.current_thread() is threading.main_thread():
      for name in self.SIGNALS:
        sig = getattr(signal, name)
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    import signal  # pylint: disable=g-import-not-at-top
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}
    return False
