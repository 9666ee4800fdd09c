"""`captionjax train`: train a captioner (or the ranking model), resuming from --workdir.

    captionjax train --workdir=runs/default [--config=NAME_OR_FILE] [--config.FIELD=VALUE ...]
    python -m captionjax.trainer --workdir=runs/default ...   (the same)

The run has up to three phases, counted by one global step:
  1. `cnn_pretrain_steps` steps of object recognition (shapes only): the CNN
     and per-grid-cell heads for shape, color and size.
  2. `num_train_steps` caption (or ranking) steps, the CNN cached (`cached_features`)
     or frozen until `finetune_cnn_after`, then fine-tuned with its own optimizer.
  3. `scst_steps` of self-critical training on the CIDEr-D reward (scst.py).
At the end the test split(s) are captioned with beam search into
WORKDIR/captions.json and scored into WORKDIR/scores.json; a `--config=ranking`
run ranks them into WORKDIR/ranking.json instead (ranking.final_test).

The same command again resumes exactly from the latest checkpoint (state,
step, RNG, input position), after `kill -9` too. SIGTERM or SIGINT saves a
checkpoint and exits (128 + signal); a NaN/Inf loss, or one above 20x the
first (NeuralTalk2's rule; SCST: a mean reward below 1/20 of its first), stops
the run and keeps the good checkpoints.
Monitoring (monitor.py): a progress bar, train_log.jsonl, TensorBoard, plots.

This file is the loop (command line: train_cli.py; models: models/build.py; jitted
steps: steps.py; optimizers: optim.py; evaluation: evaluation.py; self-critical
training: scst.py). Each phase is a `Phase` value run by `run_phase`; `Run`
holds what the phases share. B: images per batch.
"""

import dataclasses
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from captionjax import checkpoints as ckpt_lib
from captionjax import cli
from captionjax import evaluation
from captionjax import files
from captionjax import input_pipeline
from captionjax import monitor
from captionjax import optim
from captionjax import parallel
from captionjax import records
from captionjax import scst
from captionjax import steps
from captionjax import vocab as vocab_lib
from captionjax.models import build

DIVERGENCE_FACTOR = 20.0  # stop when the loss exceeds this x the first loss (NeuralTalk2)
PHASE_PRETRAIN, PHASE_CAPTION, PHASE_SCST = (ckpt_lib.PHASE_PRETRAIN, ckpt_lib.PHASE_CAPTION,
                                             ckpt_lib.PHASE_SCST)
PHASE_RANKING = ckpt_lib.PHASE_RANKING  # phase 2 of a ranking config


@dataclasses.dataclass
class Phase:
  """One training phase: global steps [first, last) of `step_fn` on `batch_fn`'s batches."""
  name: str
  step_fn: Callable  # (state, batch, rng) -> (state, metrics), jitted by run_phase
  batch_fn: Callable  # a TrainIterator batch -> the step's batch
  first: int
  last: int
  validator: Optional[evaluation.Validator] = None  # run every eval_every_steps
  learning_rate: Callable = None  # steps into the phase -> the logged learning rate
  announce: str = ""  # said when the phase starts ("{step}": the global step)
  guard: str = "loss"  # the divergence check's quantity (monitor.StepLog)
  jit: bool = True  # False: step_fn calls its own jitted parts (scst.Step)
  start: Optional[Callable] = None  # state -> state, at step `first` (a fresh optimizer)


@dataclasses.dataclass
class Run:
  """What a run's phases share: config, outputs, data, models and place in training."""
  config: Any
  workdir: str
  ckpt: ckpt_lib.Checkpointer
  stop: ckpt_lib.StopOnSignal
  placement: parallel.Placement  # the ("data", "model") mesh of all devices: its `batch`
  # places this process's rows of a training batch, `everywhere` a whole evaluation batch
  data_dir: str
  info: dict  # the data set's dataset_info.json
  vocab: vocab_lib.Vocabulary
  train_data: input_pipeline.SplitData
  val_data: Optional[input_pipeline.SplitData]
  cnn: Any = None  # the flax modules of models/build.py
  lm: Any = None
  logger: Optional[monitor.Logger] = None
  meta: dict = dataclasses.field(default_factory=dict)  # recorded in every checkpoint's meta
  rng: Any = None  # the training PRNG key (folded with the step inside the steps)
  total_steps: int = 0
  progress: bool = True
  step: int = 0  # global steps done
  position: int = 0  # examples of the current phase consumed
  first_loss: dict = dataclasses.field(default_factory=dict)  # phase -> its first loss
  features: dict = dataclasses.field(default_factory=dict)  # split -> cached CNN features
  saved_step: Optional[int] = None

  def save(self, state, phase: str) -> None:
    """Checkpoints `state` at the current step (monitor.Diverged if it is not finite)."""
    host = parallel.tree_to_host(state)  # host sync (gathered from every process)
    monitor.check_finite(host, where=f"step {self.step}: ")
    self.ckpt.save(self.step, host, host_copy=True, meta={
        "step": self.step, "phase": phase, **self.meta, "data_position": self.position,
        "rng": np.asarray(self.rng).tolist(), "first_loss": self.first_loss,
        "config": self.config.to_dict()})
    self.saved_step = self.step


def say(msg) -> None:  # sys.stderr looked up at each call (tests swap it)
  print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the loop


def train_and_evaluate(config, workdir: str, progress: bool = True,
                       start_from: str | None = None) -> dict:
  """Trains (resuming from `workdir`), then captions and scores the test split.

  `start_from`: another run's workdir whose latest checkpoint initializes the
  model (not the optimizer or the step) when `workdir` has no checkpoint yet.
  Raises OSError (workdir), ValueError (config, data, checkpoints),
  monitor.Diverged and checkpoints.Preempted (SIGTERM/SIGINT, after saving).
  """
  t_start = time.time()
  ckpt_lib.check_workdir(workdir)
  place = _placement(config)  # bad device counts fail before the checkpointer starts
  ckpt = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints, cleanup=True)
  latest = ckpt.latest_step()
  if latest is not None:  # said first, before the slow parts
    say(f"resuming from step {latest}: {ckpt.path(latest)}")
  try:
    with ckpt_lib.StopOnSignal() as stop:  # SIGTERM/SIGINT: checkpoint and stop
      return _train(config, workdir, progress, start_from, ckpt, latest, stop, t_start, place)
  except ckpt_lib.Preempted as e:
    if e.saved:
      raise
    # Outside the training loop (startup, evaluation, final captioning): stop at once.
    last = ckpt.latest_step()
    raise ckpt_lib.Preempted(e.signum, f"{e} before a new checkpoint; " + (
        f"the last one is {ckpt.path(last)}; run the same command to resume"
        if last is not None else "none saved yet")) from None
  finally:
    ckpt.manager.close()


def _placement(config) -> parallel.Placement:
  """The devices' mesh: batches split over "data"; one device is the trivial mesh."""
  place = parallel.Placement.create(config.get("model_parallel", 1))
  place.check_batch(config.batch_size, "config.batch_size")
  if config.eval_batch_size % place.data_size:  # rounded up: padding is never scored
    n = -(-config.eval_batch_size // place.data_size) * place.data_size
    say(f"note: config.eval_batch_size={config.eval_batch_size} -> {n}, a multiple of the "
        f"{place.data_size} devices")
    config.eval_batch_size = n
  if jax.process_count() > 1:
    say(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} of {jax.device_count()} devices")
  return place


def _train(config, workdir, progress, start_from, ckpt, latest, stop, t_start, place) -> dict:
  """train_and_evaluate's body, with the checkpointer and signal handlers in place."""

  # ---- data
  data_dir = input_pipeline.data_dir_for(config)
  info = records.load_info(data_dir)
  load = lambda split: input_pipeline.load_config_split(config, data_dir, split)
  r = Run(config, workdir, ckpt, stop, place, data_dir, info,
          vocab_lib.Vocabulary.load(data_dir), load("train"),
          load("val") if "val" in info["splits"] else None,
          progress=progress and parallel.is_writer(), saved_step=latest)
  say(f"data: {data_dir}: {len(r.train_data)} training images, vocabulary {len(r.vocab)}")
  input_pipeline.check_splits(data_dir, [config.test_split, *config.extra_test_splits])

  # ---- model
  r.cnn, r.lm, _ = build.make_models(config, len(r.vocab))
  init_rng, heads_rng, lm_rng, r.rng = jax.random.split(jax.random.PRNGKey(config.seed), 4)
  params, batch_stats, feat_dim = build.init_params(
      config, r.cnn, r.lm, info["image_size"], info["max_length"], init_rng, lm_rng)
  if config.model.get("cnn_weights"):
    say(f"CNN: imported weights from {config.model.cnn_weights}")

  # ---- train state: fresh, from --start_from, or restored exactly from the checkpoint
  states, state, pretrain = _start_or_resume(r, latest, start_from, params, batch_stats,
                                             feat_dim, heads_rng)
  state = place.state(state)

  # ---- phase 1: the CNN learns the objects
  if pretrain and r.step < pretrain:
    say(f"phase 1: CNN object pretraining, {pretrain} steps")
    state = run_phase(r, pretrain_phase(r, states, pretrain), state)
  if pretrain and "heads" in state["params"]:
    p, bs = parallel.tree_to_host((state["params"], state["batch_stats"]))
    state = place.state(states.caption({**states.params, "cnn": p["cnn"]}, bs, r.step))

  # ---- phase 2: captions (frozen or cached CNN, then fine-tuning); phase 3: SCST
  for phase in caption_phases(r, states, state, pretrain) + scst_phases(r, states, state, pretrain):
    state = run_phase(r, phase, state)
  ckpt.wait()  # the last checkpoint is on disk

  # ---- final: caption the test split(s) with beam search, score, write the results
  out = evaluation.final_test(
      r.cnn, r.lm, state["params"], state["batch_stats"],
      config, data_dir, info, r.vocab, place.everywhere, workdir, t_start, say)
  r.logger.log(r.step, {"phase": "test", **{k: v for k, v in out.items()
                                            if isinstance(v, (int, float))}}, echo=say)
  r.logger.refresh_plots(say)
  r.logger.close()
  return out


def _start_or_resume(r: Run, latest, start_from, params, batch_stats, feat_dim, heads_rng):
  """(TrainStates, train state on the host, pretraining steps); sets r's place.

  An existing checkpoint must fit this config and vocabulary and is restored
  exactly (state, step, RNG, input position); else `start_from` gives the
  model. Writes config.json and vocab.json.
  """
  config, meta = r.config, None
  if latest is not None:
    meta = ckpt_lib.read_meta(r.ckpt, latest)
    if start_from:
      say(f"note: --start_from={start_from} ignored: {r.workdir} has a checkpoint to resume")
    for k, a, b in ckpt_lib.check_compatible(meta, config, r.vocab, r.ckpt.path(latest)):
      say(f"note: config.{k} changed since the checkpoint: {a!r} -> {b!r}")
  elif start_from:
    params, batch_stats = ckpt_lib.load_start_from(start_from, config, r.vocab, params,
                                                   batch_stats, say)
  started_from = meta.get("started_from") if meta is not None else start_from
  if parallel.is_writer():
    files.write_text(os.path.join(r.workdir, "config.json"), config.to_json_best_effort(indent=1))
    r.vocab.save(os.path.join(r.workdir, "vocab.json"))
  pretrain = config.cnn_pretrain_steps if all(o is not None for o in r.train_data.objects) else 0
  if config.cnn_pretrain_steps and not pretrain:
    say("note: the data set has no object labels; CNN pretraining skipped")
  if started_from:  # the CNN comes from the other run
    pretrain = 0
  r.total_steps = pretrain + config.num_train_steps + config.get("scst_steps", 0)
  r.meta = {"vocab_size": len(r.vocab), "vocab_digest": ckpt_lib.vocab_digest(r.vocab.words),
            "image_size": r.info["image_size"], "max_length": r.info["max_length"],
            "started_from": started_from or None}
  states = optim.TrainStates(config, params, batch_stats, feat_dim, heads_rng)
  state = states.pretrain() if pretrain else states.caption(params, batch_stats, 0)
  if latest is not None:
    head_phase = meta["phase"] in (PHASE_CAPTION, PHASE_RANKING)
    if head_phase and pretrain:
      state = states.caption(params, batch_stats, 0)
    if meta["phase"] == PHASE_SCST:
      state = states.scst(params, batch_stats, 0)
    state = states.restore(r.ckpt, latest, state, head_phase)
    r.step, r.position = int(meta["step"]), int(meta.get("data_position", 0))
    r.first_loss = dict(meta.get("first_loss", {}))
    if meta.get("rng") is not None:
      r.rng = jnp.asarray(meta["rng"], jnp.uint32)
    say(f"resumed at step {r.step} of {r.total_steps} ({meta['phase']} phase, input position "
        f"{r.position})")
  ckpt_lib.check_free_space(r.workdir, state)
  r.logger = monitor.Logger(r.workdir, write=parallel.is_writer())
  return states, state, pretrain


# ---------------------------------------------------------------- the phases


def pretrain_phase(r: Run, states: optim.TrainStates, pretrain: int) -> Phase:
  """Phase 1: the CNN and per-cell heads learn each grid cell's object."""
  from captionjax import shapes  # pylint: disable=g-import-not-at-top
  targets = shapes.object_targets(r.train_data.objects, r.config.model.cnn_kwargs.grid)
  batch_fn = lambda b: {"image": b["image"], **{k: v[b["row"]] for k, v in targets.items()}}
  return Phase(PHASE_PRETRAIN, steps.make_pretrain_step(r.cnn, states.heads, states.tx_pre),
               batch_fn, 0, pretrain,
               learning_rate=lambda _: float(r.config.cnn_pretrain_learning_rate))


def caption_phases(r: Run, states: optim.TrainStates, state, pretrain: int) -> list:
  """Phase 2, as one or two Phases: the CNN frozen (or cached), then fine-tuned."""
  config, end = r.config, pretrain + r.config.num_train_steps
  if r.step >= end:
    return []
  mode = "features" if config.cached_features else "frozen"
  features = cached_features(r, state) if mode == "features" else {}

  def batch_fn(b):  # the CNN's input: cached features, or the images
    x = ("features", features["train"][b["row"]]) if mode == "features" else ("image", b["image"])
    return {"captions": b["captions"], "mask": b["mask"], x[0]: x[1]}

  val_refs = evaluation.references(r.data_dir, "val") if r.val_data is not None else None
  validator = lambda m: evaluation.validator_for(
      r.cnn, r.lm, m, r.val_data, val_refs, r.vocab, config, r.info["max_length"],
      r.placement.everywhere,
      features.get("val"))
  lr_at = jax.jit(states.lr_schedule)  # compiled once (eager calls compile per halving count)
  lr = lambda s: float(lr_at(np.int32(s)))
  step_fn = lambda m: steps.make_head_step(config, r.cnn, r.lm, states.tx_lm, states.tx_cnn, m)
  ft = config.finetune_cnn_after
  ft_start = pretrain + (ft if ft >= 0 else config.num_train_steps)
  name = PHASE_RANKING if build.model_kind(config) == "ranking" else PHASE_CAPTION
  say(f"phase 2: {name} training, {config.num_train_steps} steps ({mode} CNN)")
  phases = []
  if r.step < ft_start:
    phases.append(Phase(name, step_fn(mode), batch_fn, pretrain,
                        min(ft_start, end), validator(mode), lr))
  if ft_start < end:
    phases.append(Phase(name, step_fn("finetune"), batch_fn, pretrain,
                        end, validator("frozen"), lr,
                        announce="fine-tuning the CNN from step {step}"))
  return phases


def cached_features(r: Run, state) -> dict:
  """The frozen CNN's features of the train and val images (computed once, kept in r)."""
  if r.config.finetune_cnn_after >= 0:
    raise ValueError("cached_features=True freezes the CNN: set finetune_cnn_after=-1")
  if not r.features:
    t0 = time.time()
    splits = {"train": r.train_data, **({"val": r.val_data} if r.val_data is not None else {})}
    r.features = evaluation.compute_features(r.cnn, state["params"]["cnn"], state["batch_stats"],
                                             splits, r.config.eval_batch_size,
                                             r.placement.everywhere,
                                             r.config.crop_size)
    say(f"features: {r.features['train'].shape} computed in {time.time() - t0:.1f}s")
  return r.features


def scst_phases(r: Run, states: optim.TrainStates, state, pretrain: int) -> list:
  """Phase 3: self-critical training (scst.py), with a fresh optimizer at its first step."""
  if r.step >= r.total_steps or not r.config.get("scst_steps", 0):
    return []
  mode = scst.cnn_mode(r.config)
  features = cached_features(r, state) if mode == "features" else {}
  step, batch_fn, validator = scst.phase_parts(r, states, mode, features, say)
  return [Phase(PHASE_SCST, step, batch_fn, pretrain + r.config.num_train_steps, r.total_steps,
                validator, lambda _: float(r.config.scst_learning_rate), guard="reward",
                jit=False, start=lambda s: r.placement.state(
                    states.scst(s["params"], s["batch_stats"], r.step)))]


def run_phase(r: Run, phase: Phase, state):
  """Runs global steps [phase.first, phase.last) from r.step; returns the state.

  Checkpoints every `checkpoint_every_steps`, at the end, and at once on SIGTERM
  or SIGINT (then raises Preempted); raises monitor.Diverged on a diverging loss.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  config, name, last = r.config, phase.name, phase.last
  if r.step >= last:
    return state
  if phase.announce:
    say(phase.announce.format(step=r.step))
  if phase.start is not None and r.step == phase.first:
    state = phase.start(state)
  procs = jax.process_count()  # r.position counts the examples of all processes
  it = input_pipeline.TrainIterator(
      r.train_data, config.batch_size // procs, seq_per_img=config.seq_per_img, seed=config.seed,
      start=r.position // procs if r.step > phase.first else 0, crop_size=config.crop_size,
      flip=config.flip, process_index=jax.process_index(), process_count=jax.process_count())
  jstep = phase.step_fn
  if phase.jit:
    jstep.__name__ = f"{name}_train_step"  # names the compiled program in jax.log_compiles
    jstep = jax.jit(jstep, donate_argnums=(0,))
  log = monitor.StepLog(r.logger, name, config.batch_size, phase.learning_rate, r.first_loss,
                        DIVERGENCE_FACTOR, phase.guard)
  bar = tqdm(total=last - phase.first, initial=r.step - phase.first, desc=name, unit="step",
             disable=not r.progress, dynamic_ncols=True, file=sys.stderr)
  r.stop.in_loop = True
  try:
    while r.step < last:
      batch = {k: r.placement.batch(v) for k, v in phase.batch_fn(next(it)).items()}
      t0 = time.time()
      state, metrics = jstep(state, batch, r.rng)
      log.add(r.step, state, metrics, t0)
      r.step += 1
      r.position = it.position * procs
      bar.update()
      checkpoint = r.step % config.checkpoint_every_steps == 0 or r.step == last
      if r.step % config.log_every_steps == 0 or r.step == last:
        rec = log.flush(r.step, r.step - phase.first)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", img_s=rec["images_per_s"])
      elif checkpoint or r.stop.requested:  # never save past a loss not yet checked
        log.check(r.step)
      if checkpoint or r.stop.requested:
        r.save(state, name)
      if phase.validator is not None and (r.step % config.eval_every_steps == 0
                                          or r.step == last):
        rec = phase.validator(state, r.step, r.logger)
        if rec and r.saved_step == r.step:  # the best checkpoint is kept beside the latest
          r.ckpt.record_score(r.step, *phase.validator.selection(rec))  # (score, metric)
        r.logger.refresh_plots(say)
      if r.stop.requested:
        r.ckpt.wait()
        raise ckpt_lib.Preempted(r.stop.requested, (
            f"stopped by {signal.Signals(r.stop.requested).name} at step {r.step} of "
            f"{r.total_steps}: checkpoint {r.ckpt.path(r.step)} saved; run the same command "
            "to resume"), saved=True)
  except monitor.Diverged as e:
    r.ckpt.wait()
    good = r.ckpt.latest_step()
    raise monitor.Diverged(f"training diverged: {e}; stopped. The last good checkpoint is " + (
        r.ckpt.path(good) if good is not None else "none (none saved yet)")) from None
  finally:
    r.stop.in_loop = False
    bar.close()
  return state


if __name__ == "__main__":  # python -m captionjax.trainer --workdir=W [--config=C] [--config.F=V]
  sys.exit(cli.main(["train", *sys.argv[1:]]))
