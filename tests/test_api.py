"""The public API (`import captionjax`): load, Captioner, Caption, evaluate, train.

Most tests use a workdir with random weights (test_caption's, fast); the
wheel test uses the shared trained_workdir: it builds the sdist and the
wheel, installs the wheel into a fresh virtual env, and runs there, away
from the source tree, the command, the acceptance line and every doctest of
the API (the docstrings' examples, on the trained run).
"""

import dataclasses
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest
from PIL import Image

import captionjax
from captionjax import api
from captionjax import cli
from captionjax import images as images_lib
from captionjax import inference
from captionjax import records
from captionjax import vocab as vocab_lib

from test_caption import WORDS, _pattern, _png, _tiny_model_config, write_workdir  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_NAMES = ["load", "Captioner", "Caption", "evaluate", "train"]

# imageio-ffmpeg (imported by the caption command) and the venv's pip use subprocess.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


@pytest.fixture(scope="module")
def random_model():
  m = inference.random_model(_tiny_model_config(), vocab_lib.Vocabulary(WORDS), 32, 6, seed=11)
  bias = np.array(m.params["lm"]["logit"]["bias"])
  bias[0] -= 1.0  # captions of a few words, different for each photo
  m.params["lm"]["logit"]["bias"] = bias
  return m


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, random_model):
  return write_workdir(str(tmp_path_factory.mktemp("api_run")), random_model)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Four small pictures of different sizes, as PNG files."""
  d = tmp_path_factory.mktemp("api_photos")
  paths = []
  for i, (h, w) in enumerate([(40, 60), (32, 32), (50, 30), (45, 45)]):
    p = d / f"p{i}.png"
    p.write_bytes(_png(_pattern(h, w, 10 + i)))
    paths.append(str(p))
  return paths


def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **extra)
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


# ---------------------------------------------------------------- the package


def test_import_is_light_and_lazy(workdir, photos):
  """`import captionjax` imports neither TensorFlow nor JAX; loading and captioning skip TF."""
  code = (
      "import sys\n"
      "import captionjax\n"
      "heavy = lambda: sorted(m for m in ('tensorflow', 'jax', 'flax', 'orbax') if m in sys.modules)\n"
      "print(heavy())\n"
      "load = captionjax.load\n"
      "print(heavy())\n"
      f"m = load({workdir!r})\n"
      f"m.caption({photos[0]!r})\n"
      "print(heavy())\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_env(), cwd=ROOT, check=False)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines == ["[]", "[]", "['flax', 'jax', 'orbax']"], out.stdout


def test_public_names():
  """(No capsys here: a module binding sys.stderr at import, as trainer.py's `say`
  does, would keep capsys's stream, closed after the test.)"""
  assert captionjax.__all__ == API_NAMES
  assert set(API_NAMES) <= set(dir(captionjax))
  # No submodule shadows an API name (importing captionjax.X sets captionjax.X).
  # captionjax/train.py is only run (`python -m captionjax.train`), never imported.
  for info in pkgutil.iter_modules(captionjax.__path__):
    if info.name not in ("__main__", "train"):
      importlib.import_module(f"captionjax.{info.name}")
  assert "captionjax.train" not in sys.modules  # nothing in the package imports it
  for name in API_NAMES:
    assert getattr(captionjax, name) is getattr(api, name), name
  with pytest.raises(AttributeError, match="no_such_name"):
    captionjax.no_such_name  # pylint: disable=pointless-statement
  # Every public name, and the Captioner's methods, shows an example.
  for obj in [getattr(captionjax, n) for n in API_NAMES] + [
      captionjax.Captioner.caption, captionjax.Captioner.score, captionjax]:
    assert ">>> " in (obj.__doc__ or ""), obj
  assert api.DEFAULT_METRICS == __import__("captionjax.metrics").metrics.DEFAULT_METRICS


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0
  assert capsys.readouterr().out.strip() == f"captionjax {captionjax.__version__}"


# ---------------------------------------------------------------- captioning


def test_caption_inputs_match_the_command(tmp_path, workdir, photos):
  """Paths, bytes, PIL images and arrays give the captions `captionjax caption` gives."""
  out = tmp_path / "cli.json"
  assert cli.main(["caption", f"--checkpoint={workdir}", f"--images={os.path.dirname(photos[0])}",
                   f"--output={out}", "--no_progress", "--beam_size=3", "--n_best=2"]) == 0
  expect = {r["file_name"]: r for r in json.loads(out.read_text())}
  m = captionjax.load(workdir, batch_size=4)
  ref = [expect[os.path.basename(p)] for p in photos]
  pils = [Image.open(p) for p in photos]
  arrays = [np.asarray(im.convert("RGB")) for im in pils]
  with open(photos[1], "rb") as f:
    data = f.read()
  for inputs in (photos, pils, arrays, [photos[0], data, pils[2], arrays[3]]):
    got = m.caption(inputs, beam_size=3, n_best=2)
    assert [c.text for c in got] == [r["caption"] for r in ref]
    for c, r in zip(got, ref):
      assert c.logprob == pytest.approx(r["logprob"], abs=1e-4)
      assert [(x.text, round(x.logprob, 5)) for x in c.n_best] == [
          (x["caption"], x["logprob"]) for x in r["n_best"]]
  # Decoding options pass through as the command's flags of the same names.
  assert cli.main(["caption", f"--checkpoint={workdir}", f"--images={os.path.dirname(photos[0])}",
                   f"--output={out}", "--no_progress", "--beam_size=1", "--block_trigrams",
                   "--bad_endings=none", "--min_length=2"]) == 0
  expect = {r["file_name"]: r["caption"] for r in json.loads(out.read_text())}
  got = m.caption(photos, beam_size=1, block_trigrams=True, bad_endings="none", min_length=2)
  assert [c.text for c in got] == [expect[os.path.basename(p)] for p in photos]
  assert got != m.caption(photos, beam_size=1)  # the options changed something
  # One image alone, and a uint8 batch [N, H, W, 3] of same-sized images.
  assert [c.text for c in m.caption(photos[1], beam_size=3)] == [ref[1]["caption"]]
  batch = np.stack([arrays[1], arrays[1][::-1]])
  assert [c.text for c in m.caption(batch, beam_size=3)] == [
      m.caption(arrays[1], beam_size=3)[0].text, m.caption(arrays[1][::-1], beam_size=3)[0].text]


def test_caption_fields(workdir, photos, random_model):
  m = captionjax.load(workdir)
  caps = m.caption(photos, beam_size=3, n_best=3)
  assert len({c.text for c in caps}) > 1  # the random model says different things
  for c in caps:
    assert str(c) == c.text
    assert c.n_best[0] == dataclasses.replace(c, n_best=())
    assert [x.logprob for x in c.n_best] == sorted((x.logprob for x in c.n_best), reverse=True)
    for x in c.n_best:
      assert x.tokens == tuple(random_model.vocab.word_to_ix[w] for w in x.text.split())
      assert random_model.vocab.decode(list(x.tokens) + [0]) == x.text
  assert m.caption([]) == []
  assert (m.step, m.workdir, m.image_size) == (7, workdir, 32)
  assert m.config.model.rnn_size == 16
  assert repr(m) == f"Captioner(workdir={workdir!r}, step=7, image_size=32)"


def test_sampling_stream(workdir, photos):
  a, b = captionjax.load(workdir, seed=3), captionjax.load(workdir, seed=3)
  first = [c.text for c in a.caption(photos * 2, sample=True)]
  assert [c.text for c in b.caption(photos * 2, sample=True)] == first  # same seed, same samples
  later = [c.text for c in a.caption(photos * 2, sample=True)]
  assert later != first  # the stream moves on
  # Several samples per image come back as n_best, likeliest first.
  c, = a.caption(photos[0], sample=True, num_samples=3, n_best=3)
  assert len(c.n_best) == 3 and c.n_best[0].text == c.text
  assert [x.logprob for x in c.n_best] == sorted((x.logprob for x in c.n_best), reverse=True)
  with pytest.raises(ValueError, match="temperature"):
    a.caption(photos[0], sample=True, temperature=0.0)
  with pytest.raises(ValueError, match="n_best"):
    a.caption(photos[0], sample=True, n_best=2)
  with pytest.raises(ValueError, match="n_best"):
    a.caption(photos[0], beam_size=2, n_best=3)
  with pytest.raises(TypeError, match="unknown decoding option 'top_q'"):
    a.caption(photos[0], sample=True, top_q=0.9)
  with pytest.raises(ValueError, match="top_p"):
    a.caption([], sample=True, top_p=2.0)  # checked even with nothing to caption


def test_bad_inputs(tmp_path, workdir, photos):
  m = captionjax.load(workdir)
  missing = str(tmp_path / "nope.jpg")
  with pytest.raises(images_lib.ImageError, match=f"{missing}: file not found"):
    m.caption([photos[0], missing])
  with pytest.raises(ValueError, match=r"images\[0\] \(array \(4, 4, 3\)\): an array of float32"):
    m.caption([np.zeros((4, 4, 3), np.float32)])
  with pytest.raises(ValueError, match=r"images\[1\] \(array \(4, 4, 5\)\): an array of shape"):
    m.caption([photos[0], np.zeros((4, 4, 5), np.uint8)])
  with pytest.raises(TypeError, match=r"images\[1\]: expected .* got int"):
    m.caption([photos[0], 3])
  with pytest.raises(ValueError, match="no such directory"):
    captionjax.load(tmp_path / "none")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="config.json"):
    captionjax.load(tmp_path / "empty")


# ---------------------------------------------------------------- scoring


def _logprob_by_loop(model, image: np.ndarray, ids) -> float:
  """log P(ids, END | image) one decode step at a time, in float64 numpy."""
  from captionjax.models import build  # pylint: disable=g-import-not-at-top
  from captionjax.models.captioner import Captioner  # pylint: disable=g-import-not-at-top
  feats = model.cnn.apply(build.cnn_variables(model.params["cnn"], model.batch_stats),
                          build.images_to_input(image[None]), train=False)
  v = {"params": {k: model.params[k] for k in build.LM_KEYS}}
  carry = model.lm.apply(v, model.lm.apply(v, feats, method=Captioner.encode),
                         method=Captioner.decode_start)
  total, prev = 0.0, 0
  for target in list(ids) + [0]:
    carry, logits = model.lm.apply(v, carry, np.array([prev], np.int32),
                                   method=Captioner.decode_step)
    x = np.asarray(logits[0], np.float64)
    total += x[target] - x.max() - np.log(np.exp(x - x.max()).sum())
    prev = target
  return total


def test_score(workdir, photos, random_model):
  """Against a step-by-step numpy reference (the doctests check it against the decoder's
  own log-probabilities on the trained run)."""
  m = captionjax.load(workdir, batch_size=2)
  sentences = ["a red circle", "the blue square on the left", "", "red red red red red red red"]
  image = m._prepare(photos[0])  # pylint: disable=protected-access
  s = m.score(photos[0], [sentences])  # -> [1, C]
  assert s.shape == (1, 4)
  for j, text in enumerate(sentences):
    ids = random_model.vocab.encode(text.split(), random_model.max_length)  # cut at 6 words
    assert s[0, j] == pytest.approx(_logprob_by_loop(random_model, image, ids), abs=1e-4)
  # Per token: the words kept and END.
  norm = m.score(photos[0], [sentences], length_normalized=True)
  np.testing.assert_allclose(norm[0], s[0] / np.array([4, 7, 1, 7]))
  # As prepro tokenizes: case and punctuation go, unknown words are UNK.
  a = m.score(photos[:1], ["A RED, circle!"])
  assert a[0] == pytest.approx(s[0, 0])
  unk = random_model.vocab.unk_id
  assert m.score(photos[0], "a zebra circle")[0] == pytest.approx(
      _logprob_by_loop(random_model, image, [1, unk, 4]), abs=1e-4)
  # One string for every image, one per image, or a list per image: same numbers.
  each = m.score(photos, "a red circle")  # 4 images in batches of 2
  assert each.shape == (4,) and each.dtype == np.float64
  for i in (1, 3):
    assert each[i] == pytest.approx(_logprob_by_loop(
        random_model, m._prepare(photos[i]), [1, 2, 4]), abs=1e-4)  # pylint: disable=protected-access
  np.testing.assert_allclose(each, m.score(photos, ["a red circle"] * 4))
  np.testing.assert_allclose(each, m.score(photos, [["a red circle", "x"]] * 4)[:, 0])
  with pytest.raises(ValueError, match="sentences: 2 for 1 image"):
    m.score(photos[0], ["a", "b"])
  with pytest.raises(ValueError, match="same number"):
    m.score(photos[:2], [["a"], ["a", "b"]])
  with pytest.raises(TypeError, match="string"):
    m.score(photos[:1], [[3]])


# ---------------------------------------------------------------- evaluate, train


def test_evaluate_matches_the_command(tmp_path, capsys):
  refs = {1: ["a red circle on the left", "a small red circle"],
          2: ["two blue squares", "a pair of blue squares"],
          3: ["a green triangle", "a triangle that is green"]}
  res = {1: "a red circle", 2: "two blue squares", 3: "a green circle"}
  ann = {"images": [{"id": k} for k in refs],
         "annotations": [{"image_id": k, "caption": c} for k, cs in refs.items() for c in cs]}
  records_ = [{"image_id": k, "caption": c} for k, c in res.items()]
  (tmp_path / "ann.json").write_text(json.dumps(ann))
  (tmp_path / "res.json").write_text(json.dumps(records_))
  metrics = "bleu,rouge,cider"
  assert cli.main(["evaluate", f"--annotations={tmp_path / 'ann.json'}",
                   f"--results={tmp_path / 'res.json'}", f"--metrics={metrics}"]) == 0
  expect = json.loads(capsys.readouterr().out)
  assert sorted(expect) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "ROUGE_L"]
  assert expect["CIDEr"] > 0
  captions = {k: captionjax.Caption(v, -1.0) for k, v in res.items()}
  for r, s in [(refs, res), (str(tmp_path / "ann.json"), str(tmp_path / "res.json")),
               (tmp_path / "ann.json", records_), (refs, captions)]:
    assert captionjax.evaluate(r, s, metrics=metrics.split(",")) == expect
  with pytest.raises(ValueError, match="without references, e.g. 4"):
    captionjax.evaluate(refs, {**res, 4: "a circle"}, metrics=["bleu"])
  with pytest.raises(ValueError, match="unknown 'blue'"):
    captionjax.evaluate(refs, res, metrics="blue")
  with pytest.raises(ValueError, match="needs 'image_id' and 'caption'"):
    captionjax.evaluate(refs, [{"image_id": 1}], metrics="bleu")


def test_train_config_errors(tmp_path):
  """Bad configs and overrides fail before anything is written."""
  with pytest.raises(ValueError, match="unknown config field 'model.no_such'"):
    captionjax.train("default", tmp_path / "a", overrides={"model.no_such": 1})
  with pytest.raises(ValueError, match="expected true or false"):
    captionjax.train("default", tmp_path / "a", overrides={"flip": "maybe"})
  with pytest.raises(ValueError, match="no config to resume"):
    captionjax.train(None, tmp_path / "a")
  with pytest.raises(ValueError, match="no such file or config name"):
    captionjax.train("no_such_config", tmp_path / "a")
  assert not os.path.exists(tmp_path / "a")


# ---------------------------------------------------------------- doctests, wheel, docs


@pytest.fixture(scope="module")
def doc_dir(tmp_path_factory, trained_workdir, shapes_dir):
  """The doctests' folder: runs/default (a copy of the trained run, which the
  train example resumes), data/annotations_test.json and photo.jpg."""
  from captionjax import input_pipeline  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("doc")
  shutil.copytree(trained_workdir, d / "runs" / "default")
  (d / "data").mkdir()
  shutil.copy(records.annotations_path(shapes_dir, "test"), d / "data" / "annotations_test.json")
  image = input_pipeline.load_split(shapes_dir, "test").images[0]
  Image.fromarray(image).save(d / "photo.jpg", quality=95)
  return d


def test_trained_run(trained_workdir):
  """The API captions the trainer's test images as the trainer did (captions.json)."""
  from captionjax import input_pipeline  # pylint: disable=g-import-not-at-top
  with open(os.path.join(trained_workdir, "config.json"), encoding="utf-8") as f:
    data = input_pipeline.load_split(json.load(f)["dataset"], "test")
  with open(os.path.join(trained_workdir, "captions.json"), encoding="utf-8") as f:
    trainer = {c["image_id"]: c for c in json.load(f)}
  m = captionjax.load(trained_workdir)
  got = m.caption(data.images[:4])
  for i, c in enumerate(got):
    assert c.text == trainer[int(data.image_id[i])]["caption"]
    assert c.logprob == pytest.approx(trainer[int(data.image_id[i])]["logprob"], abs=1e-3)
  # A caption that ends (END within max_length words): its decoder log-probability is
  # the teacher-forced one, whatever the decoding rules masked to choose it.
  max_length = m._model.max_length  # pylint: disable=protected-access
  ended = [(i, c) for k in (0, 2)
           for i, c in enumerate(m.caption(data.images[:2], min_length=k, bad_endings="none"))
           if len(c.text.split()) <= max_length]
  assert ended
  logp = m.score(data.images[[i for i, _ in ended]], [c.text for _, c in ended])
  np.testing.assert_allclose(logp, [c.logprob for _, c in ended], atol=1e-3)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  """`python -m build` (sdist, then the wheel from the sdist) of a copy of the sources."""
  d = tmp_path_factory.mktemp("dist")
  src = d / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "requirements.txt"):
    shutil.copy(os.path.join(ROOT, name), src / name)
  shutil.copytree(os.path.join(ROOT, "captionjax"), src / "captionjax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  out = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                        str(d / "out"), str(src)], capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return d / "out"


# Run by the installed package, in the doctests' folder: the acceptance line,
# where captionjax came from, then every doctest of the API (failures reported).
_IN_VENV = """
import sys
import captionjax
assert "tensorflow" not in sys.modules and "jax" not in sys.modules, sorted(sys.modules)
m = captionjax.load('runs/default'); print(m.caption('photo.jpg')[0].text)
print("FILE", captionjax.__file__)
import doctest, captionjax.api
for module in (captionjax.api, captionjax):
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for test in doctest.DocTestFinder().find(module):
    runner.run(test, out=sys.stdout.write)
  print("DOCTESTS", module.__name__, runner.failures, runner.tries)
"""


def test_wheel_in_fresh_venv(dist, doc_dir, jax_compilation_cache):
  """The wheel, installed alone in a new virtual env: the command, the acceptance
  line and the API's doctests (on the trained run) work there."""
  version = captionjax.__version__
  wheel = dist / f"captionjax-{version}-py3-none-any.whl"
  assert wheel.exists() and (dist / f"captionjax-{version}.tar.gz").exists(), os.listdir(dist)
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
  assert {"captionjax/__init__.py", "captionjax/api.py", "captionjax/configs/default.py",
          "captionjax/metrics/cider.py", "captionjax/models/lm.py",
          "captionjax/static/index.html"} <= names
  assert not any(n.startswith("tests/") for n in names)

  # A fresh env holding only the wheel; its dependencies come from this
  # environment's site-packages through a .pth file (not the source tree).
  venv = doc_dir.parent / "fresh_venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                  "--no-deps", "--no-index", str(wheel)], check=True)
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
  deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
  with open(os.path.join(site, "_captionjax_test_deps.pth"), "w", encoding="utf-8") as f:
    f.write("\n".join(deps) + "\n")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  env.update(TF_CPP_MIN_LOG_LEVEL="3", CAPTIONJAX_METEOR="0",  # no Java start (train's example)
             JAX_COMPILATION_CACHE_DIR=jax_compilation_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=doc_dir,
                                    check=False)

  out = run(str(venv / "bin" / "captionjax"), "--version")
  assert out.returncode == 0 and out.stdout.strip() == f"captionjax {version}", out
  out = run(str(venv / "bin" / "captionjax"), "--help")
  assert out.returncode == 0 and "caption" in out.stdout, out
  out = run(python, "-c", _IN_VENV)
  assert out.returncode == 0, out.stderr[-5000:]
  lines = out.stdout.splitlines()
  assert lines[0] == captionjax.load(doc_dir / "runs" / "default").caption(
      str(doc_dir / "photo.jpg"))[0].text
  assert lines[1] == f"FILE {site}/captionjax/__init__.py"
  results = [line.split()[1:] for line in lines if line.startswith("DOCTESTS ")]
  assert [r[:2] for r in results] == [["captionjax.api", "0"], ["captionjax", "0"]], out.stdout
  assert int(results[0][2]) >= 30 and int(results[1][2]) >= 2


def test_api_docs_build(tmp_path):
  """The API reference builds with no warning and covers the five names only."""
  out = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "build_api.py"),
                        f"--output_dir={tmp_path}"], capture_output=True, text=True,
                       env=_env(), check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  page = (tmp_path / "captionjax.html").read_text(encoding="utf-8")
  for name in API_NAMES + ["Captioner.caption", "Captioner.score"]:
    assert f'id="{name}"' in page, name
  assert "captionjax.load(&#34;runs/default&#34;)" in page or 'captionjax.load("runs/default")' in page
  assert sorted(os.listdir(tmp_path)) == ["captionjax.html", "index.html", "search.js"]
  assert "Submodules" not in page
