"""Shared fixtures: small generated data sets, made once per test session.

Under pytest-xdist the session fixtures that make data, train runs or fill
the JAX compilation cache are shared by all workers of the run: the first
worker makes them, the others wait for it and reuse them (`_shared`).
"""

import contextlib
import html.parser
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# METEOR starts Java (about 12 s of CPU) at every final test: the suite's
# training runs, in process and in subprocesses, score without it, except the
# session's trained_workdir and the tests that check METEOR (`meteor_on`).
os.environ.setdefault("CAPTIONJAX_METEOR", "0")

import pytest  # pylint: disable=g-import-not-at-top

TINY_SPLITS = {"train": 96, "val": 20, "test": 20, "novel": 10}


def _shared_path(tmp_path_factory, name: str) -> str:
  """A folder every xdist worker of this run shares (this process's own without xdist)."""
  uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if not uid:
    return str(tmp_path_factory.mktemp(name))
  path = tmp_path_factory.getbasetemp().parent / f"{name}-{uid[:12]}"
  path.mkdir(exist_ok=True)
  return str(path)


@contextlib.contextmanager
def _shared(path: str):
  """Yields True in the one process that must make `path` (the others wait for it,
  then get False); a failed attempt leaves it to the next."""
  import fcntl  # pylint: disable=g-import-not-at-top
  with open(path + ".lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = path + ".done"
    make = not os.path.exists(done)
    yield make
    if make:
      open(done, "w", encoding="utf-8").close()  # pylint: disable=consider-using-with


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
  """One persistent JAX compilation cache per session, also handed to the
  `captionjax train` subprocesses (JAX_COMPILATION_CACHE_DIR): they load what
  this process compiled (trained_workdir) instead of compiling it again."""
  import jax
  path = _shared_path(tmp_path_factory, "jax_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


@pytest.fixture
def meteor_on(monkeypatch):
  """METEOR scored (the suite turns it off elsewhere: see the top of this file)."""
  monkeypatch.setenv("CAPTIONJAX_METEOR", "1")


@pytest.fixture(scope="module")
def highest_matmul_precision():
  """Full float32 matmuls and convolutions for a whole test module, on any backend.

  Modules that compare numbers with a reference (numpy, a step loop, brute
  force, Keras, PyTorch's layout) use it with
  `pytestmark = pytest.mark.usefixtures("highest_matmul_precision")`: GPUs
  default to TF32 (10-bit mantissa) and TPUs to bfloat16 passes, which move
  the results past float32 tolerances and can flip a beam search's ties.
  Module-scoped, so that the module's own fixtures compile under it too.
  """
  import jax
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A tiny shapes data set, generated and preprocessed (64 px)."""
  from captionjax import shapes
  root = _shared_path(tmp_path_factory, "shapes")  # prepare() takes turns
  return shapes.prepare(root, TINY_SPLITS, image_size=64, seed=0, num_workers=1)


# The default recipe shrunk to seconds on the tiny shapes set, as --config.FIELD=VALUE.
TINY_OVERRIDES = {
    "batch_size": 8,
    "model.cnn_kwargs.widths": (8, 16, 32),
    "model.input_encoding_size": 32,
    "model.rnn_size": 32,
    "cnn_pretrain_steps": 10,
    "num_train_steps": 20,
    "learning_rate_decay_start": 10,
    "learning_rate_decay_every": 5,
    "eval_every_steps": 10,
    "eval_num_images": 20,
    "eval_batch_size": 10,
    "log_every_steps": 5,
    "checkpoint_every_steps": 10,
    "scst_steps": 0,  # test_scst runs the self-critical phase
}


def tiny_args(data_dir: str, **overrides) -> list:
  """`captionjax train` flags for the tiny recipe (overrides: FIELD=VALUE, dots as __)."""
  fields = {"dataset": data_dir, **TINY_OVERRIDES,
            **{k.replace("__", "."): v for k, v in overrides.items()}}
  return [f"--config.{k}={v!r}" if not isinstance(v, str) else f"--config.{k}={v}"
          for k, v in fields.items()]


def tiny_config(data_dir: str, **overrides):
  """The default recipe shrunk to seconds on the tiny shapes set."""
  from captionjax import configs
  return configs.load_config("default", [a[len("--config."):] for a in tiny_args(
      data_dir, **overrides)])


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, shapes_dir):
  """A workdir with a finished tiny run of `captionjax train` (checkpoints, logs,
  captions, scores), run in process with jax.log_compiles on.

  WORKDIR.events.txt lists, in order, each compilation ("compile NAME") and
  each train_log record ("log STEP PHASE"), for the recompilation test.
  Under xdist one worker trains it and the others reuse it.
  """
  workdir = _shared_path(tmp_path_factory, "run")
  with _shared(workdir) as make:
    if make:
      _train_with_events(workdir, shapes_dir)
  return workdir


def _train_with_events(workdir: str, shapes_dir: str) -> None:
  """trained_workdir's run, with its WORKDIR.events.txt."""
  import logging
  import jax
  from captionjax import cli
  from captionjax import monitor
  events = []

  class Compiles(logging.Handler):
    def emit(self, record):
      msg = record.getMessage()
      if msg.startswith("Compiling "):
        events.append("compile " + msg.split()[1])

  orig_log = monitor.Logger.log

  def log(self, step, record, echo=None):
    events.append(f"log {step} {record.get('phase')}")
    return orig_log(self, step, record, echo)

  handler = Compiles()
  jax_logger = logging.getLogger("jax")
  jax_logger.addHandler(handler)
  monitor.Logger.log = log
  meteor = os.environ.get("CAPTIONJAX_METEOR")
  os.environ["CAPTIONJAX_METEOR"] = "1"  # its scores.json has every metric
  try:
    with jax.log_compiles(True):
      rc = cli.main(["train", f"--workdir={workdir}", "--no_progress",
                     *tiny_args(shapes_dir, extra_test_splits=())])
  finally:
    monitor.Logger.log = orig_log
    jax_logger.removeHandler(handler)
    os.environ["CAPTIONJAX_METEOR"] = meteor
  assert rc == 0, f"captionjax train exited with {rc}"
  with open(workdir + ".events.txt", "w", encoding="utf-8") as f:
    f.write("\n".join(events) + "\n")


# The tiny set's 96 training images need a CNN pretrained longer than the
# captioner's 10 steps, and a faster learning rate.
RANKING_OVERRIDES = {"model.embed_size": 32, "cnn_pretrain_steps": 200, "learning_rate": 1e-3,
                     "num_train_steps": 500, "learning_rate_decay_start": -1,
                     "eval_every_steps": 250, "checkpoint_every_steps": 250,
                     "log_every_steps": 50}


def tiny_ranking_config(data_dir: str, **overrides):
  """The ranking config shrunk like tiny_config."""
  from captionjax import configs
  fields = {k.replace(".", "__"): v for k, v in RANKING_OVERRIDES.items()}
  return configs.load_config("ranking", [a[len("--config."):] for a in tiny_args(
      data_dir, **{**fields, **overrides})])


@pytest.fixture(scope="session")
def ranking_workdir(tmp_path_factory, shapes_dir):
  """A workdir with a finished tiny run of `captionjax train --config=ranking`."""
  from captionjax import cli
  workdir = _shared_path(tmp_path_factory, "ranking_run")
  with _shared(workdir) as make:
    if make:
      args = tiny_args(shapes_dir, **{k.replace(".", "__"): v
                                      for k, v in RANKING_OVERRIDES.items()})
      rc = cli.main(["train", "--config=ranking", f"--workdir={workdir}", "--no_progress", *args])
      assert rc == 0, f"captionjax train --config=ranking exited with {rc}"
  return workdir


class HtmlCollector(html.parser.HTMLParser):
  """Text of the elements with a class of interest, and every tag seen."""

  def __init__(self):
    super().__init__()
    self.stack, self.texts, self.tags, self.attrs = [], {}, [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)
    self.attrs.append((tag, dict(attrs)))
    classes = (dict(attrs).get("class") or "").split()
    if tag not in ("img", "meta", "br"):
      self.stack.append((tag, classes, []))

  def handle_endtag(self, tag):
    while self.stack:
      t, classes, buf = self.stack.pop()
      for c in classes:
        self.texts.setdefault(c, []).append("".join(buf))
      if self.stack:
        self.stack[-1][2].extend(buf)
      if t == tag:
        break

  def handle_data(self, data):
    if self.stack:
      self.stack[-1][2].append(data)


def parse_html(text: str) -> HtmlCollector:
  """The HtmlCollector of an HTML page (the gallery's and the ranking demo's tests)."""
  c = HtmlCollector()
  c.feed(text)
  c.close()
  return c
