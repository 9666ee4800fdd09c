"""Watching a training run: train_log.jsonl, TensorBoard, stdout and PNG plots.

    WORKDIR/train_log.jsonl       one JSON object per logged step
    WORKDIR/tensorboard/          scalars and sample captions (tensorboardX)
    WORKDIR/plots/loss.png        training loss per phase (and validation loss)
    WORKDIR/plots/val_scores.png  validation scores (CIDEr, BLEU-4, ...)

The plots are redrawn from train_log.jsonl at each evaluation. A resumed run
appends to the same log; for a step logged twice the later record wins.
"""

import json
import math
import os
import time

LOG_FILE = "train_log.jsonl"
PLOT_DIR = "plots"
# Validation scores drawn in val_scores.png, when logged (R@K: a ranking run's, in percent).
PLOTTED_SCORES = ("val_CIDEr", "val_Bleu_4", "val_ROUGE_L", "val_hallucination_free",
                  "val_sentence_R@1", "val_sentence_R@10", "val_image_R@1", "val_image_R@10")


class Logger:
  """train_log.jsonl, TensorBoard scalars and text, and stdout lines."""

  def __init__(self, workdir: str, write: bool = True):
    """`write` False (processes other than 0 of a multi-process run): nothing at all."""
    self.workdir, self.write = workdir, write
    self.path = os.path.join(workdir, LOG_FILE)
    self.tb = None
    if not write:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self.tb = None

  def log(self, step: int, record: dict, echo=None):
    if not self.write:
      return
    record = {"step": int(step), **record, "time": round(time.time(), 3)}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
          self.tb.add_scalar(k, v, step)
    if echo is not None:
      echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in record.items() if k != "time"))

  def refresh_plots(self, say=print):
    """Redraws WORKDIR/plots/*.png from the log (skipped, with a note, without matplotlib)."""
    if not self.write:
      return
    try:
      plot_curves(self.workdir)
    except ImportError as e:
      say(f"note: no plots ({e})")
    self.flush()

  def text(self, step: int, tag: str, text: str):
    if self.tb is not None:
      self.tb.add_text(tag, text, step)

  def flush(self):
    if self.tb is not None:
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def read_log(workdir: str) -> list:
  """The records of WORKDIR/train_log.jsonl (a torn last line is skipped)."""
  out = []
  try:
    with open(os.path.join(workdir, LOG_FILE), encoding="utf-8") as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except ValueError:
          continue  # a line cut short by a kill
  except FileNotFoundError:
    pass
  return out


def _series(records, key, phase=None):
  """step -> value of `key` (the last record of a step wins), sorted by step."""
  by_step = {}
  for r in records:
    if key in r and (phase is None or r.get("phase") == phase) and r[key] is not None:
      by_step[r["step"]] = r[key]
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _save(plt, fig, path: str) -> str:
  """Writes a figure as PNG, frees it, returns the path."""
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def plot_curves(workdir: str) -> list:
  """Draws plots/loss.png and plots/val_scores.png from the log; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_log(workdir)
  out_dir = os.path.join(workdir, PLOT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  written = []

  fig, ax = plt.subplots(figsize=(7, 4))
  phases = []
  for r in records:
    if "loss" in r and r.get("phase") not in phases and "reward" not in r:
      phases.append(r.get("phase"))
  for phase in phases:
    steps, values = _series(records, "loss", phase)
    ax.plot(steps, values, label=f"train loss ({phase})")
  steps, values = _series(records, "val_loss")
  if steps:
    ax.plot(steps, values, "o-", label="validation loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (captions: cross-entropy per token)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  if phases or steps:
    ax.legend()
  written.append(_save(plt, fig, os.path.join(out_dir, "loss.png")))

  fig, ax = plt.subplots(figsize=(7, 4))
  drawn = False
  for key in PLOTTED_SCORES:
    steps, values = _series(records, key)
    if steps:
      ax.plot(steps, values, "o-", label=key[len("val_"):])
      drawn = True
  steps, values = _series(records, "reward")
  if steps:  # self-critical training: the samples' mean CIDEr-D on training images
    ax.plot(steps, values, label="train reward (SCST samples' CIDEr-D)")
    drawn = True
  ax.set_xlabel("step")
  ax.set_ylabel("validation score")
  ax.grid(alpha=0.3)
  if drawn:
    ax.legend()
  written.append(_save(plt, fig, os.path.join(out_dir, "val_scores.png")))
  return written


# ---------------------------------------------------------------- divergence


class Diverged(RuntimeError):
  """The loss became NaN or Inf, or rose above `factor` x the first loss."""
  exit_status = 1  # the run failed (not bad input): see captionjax/cli.py


def check_loss(loss: float, first_loss, factor: float = 20.0, where: str = "") -> None:
  """NeuralTalk2's rule: stop when the loss explodes past factor x the first loss."""
  import math  # pylint: disable=g-import-not-at-top
  if not math.isfinite(loss):
    raise Diverged(f"{where}loss is {loss}")
  if first_loss is not None and first_loss > 0 and loss > factor * first_loss:
    raise Diverged(f"{where}loss {loss:.4g} is above {factor:g}x the first loss {first_loss:.4g}")


def check_finite(tree, where: str = "") -> None:
  """Diverged if a floating-point array of `tree` (numpy, on the host) has a NaN or Inf."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
      raise Diverged(f"{where}non-finite values in {jax.tree_util.keystr(path)}")


class StepLog:
  """A phase's metrics between logging steps: sums on the device, read on log steps.

  `add` after every step (the first step's compile time and loss are logged
  and checked), `flush` on logging steps (one host sync), `check` before a
  checkpoint between them. `first_loss` (phase -> its first loss) is shared
  with the checkpoints: NeuralTalk2's divergence rule compares against it.
  With guard="reward" (self-critical training, whose loss is near zero and of
  either sign) the phase's first reward is kept instead, and a mean reward
  below 1/factor of it stops the run; a NaN/Inf loss stops every phase.
  Metrics "X_sum" other than the loss's are logged as X = sum / X_count where
  the metrics have an "X_count", else sum / count; "X_total" as X = total / steps.
  """

  def __init__(self, logger: Logger, phase: str, batch_size: int, learning_rate,
               first_loss: dict, factor: float, guard: str = "loss"):
    self.logger, self.phase, self.batch_size = logger, phase, batch_size
    self.learning_rate, self.first_loss, self.factor = learning_rate, first_loss, factor
    self.guard = guard  # "loss" (diverged above factor x the first) or "reward" (below 1/factor)
    self.acc, self.t_log, self.n, self.compiling = None, time.time(), 0, True

  def add(self, step: int, state, metrics, t0: float) -> None:
    """Adds the metrics of global step `step` + 1 (started at time t0)."""
    import jax  # pylint: disable=g-import-not-at-top
    if self.compiling:  # the first step compiles: time it, and keep it out of images/s
      jax.block_until_ready(state)
      self.logger.log(step, {"phase": self.phase, "compile_seconds": round(time.time() - t0, 2)})
      self.compiling, self.t_log = False, time.time()
      check_loss(_loss_of(metrics), None, where=f"step {step + 1}: ")
      self.first_loss.setdefault(self.phase, self._guarded(metrics))  # the reference for divergence
    self.acc = metrics if self.acc is None else jax.tree_util.tree_map(
        lambda a, b: a + b, self.acc, metrics)
    self.n += 1

  def flush(self, step: int, phase_step: int) -> dict:
    """Logs the mean metrics since the last log step (a host sync); returns the record."""
    import jax  # pylint: disable=g-import-not-at-top
    m = jax.device_get(self.acc)
    dt = time.time() - self.t_log
    rec = {"phase": self.phase, "loss": _loss_of(m),
           "images_per_s": round(self.n * self.batch_size / dt, 1)}
    if "exact_sum" in m:
      rec["exact_scene_accuracy"] = float(m["exact_sum"] / (self.n * self.batch_size))
    for k, v in m.items():
      if k.endswith("_sum") and k not in ("loss_sum", "exact_sum"):
        name = k[:-len("_sum")]
        rec[name] = float(v) / max(float(m.get(name + "_count", m["count"])), 1.0)
      elif k.endswith("_total"):
        rec[k[:-len("_total")]] = round(float(v) / self.n, 3)
    rec["learning_rate"] = self.learning_rate(phase_step)
    self.logger.log(step, rec)
    self.acc, self.t_log, self.n = None, time.time(), 0
    self._check(m, step)
    return rec

  def check(self, step: int) -> None:
    """Diverged if the loss since the last log step diverged (a host sync)."""
    import jax  # pylint: disable=g-import-not-at-top
    self._check(jax.device_get(self.acc), step)

  def _guarded(self, m) -> float:
    """The quantity the divergence rule compares with its first value."""
    if self.guard == "reward":
      return float(m["reward_sum"]) / max(float(m["count"]), 1.0)
    return _loss_of(m)

  def _check(self, m, step: int) -> None:
    """Diverged if the metrics `m` (summed since the last check) diverged."""
    first, where = self.first_loss.get(self.phase), f"step {step}: "
    if self.guard != "reward":
      check_loss(_loss_of(m), first, self.factor, where=where)
      return
    check_loss(_loss_of(m), None, where=where)  # only NaN/Inf: the loss has no scale
    reward = self._guarded(m)
    if not math.isfinite(reward) or (first is not None and first > 0
                                     and reward < first / self.factor):
      raise Diverged(f"{where}mean reward {reward:.4g} is below 1/{self.factor:g} of the "
                     f"first {first:.4g}")


def _loss_of(m) -> float:
  return float(m["loss_sum"]) / max(float(m["count"]), 1.0)
