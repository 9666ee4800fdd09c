"""Tests of captionjax.metrics against pycocoevalcap's own scorers.

Every metric is compared with pycocoevalcap (`Bleu`, `Rouge`, `Cider`,
`Meteor`, `PTBTokenizer`) called directly on caption text generated here:
corpus and per-image scores to 1e-6 (METEOR 1e-4). Java-backed references skip
only when `java` is not on PATH.
"""

import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from captionjax import metrics
from captionjax.metrics import tokenizer
from tests import metrics_data

HAVE_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason="java not on PATH")
TOL = 1e-6
METEOR_TOL = 1e-4
GLUE = [".", ",", ";", ":", "!", "?", "'s", "..."]  # "?n't" glued is a known miss
INSERTS = ['"', "(", ")", "-", "--", "&", "#1", "2.5", "10,000", "3/4", "é", "“", "”",
           "‘", "’", "—", "…", "e.g.", "etc.", "U.S.", "Mr.", "T-shirt", "don't",
           "it's", "cannot", "gonna", "[", "]", "*", "%", "$", "£", "°", "'90s",
           "o'clock", "rock 'n' roll", "co-op", "a.m.", "No. 5", "½", "ñ", "  ", "\t"]


def perturbed_captions(rng, count):
  """Template captions with punctuation, quotes, numbers and unicode mixed in."""
  out = []
  for cap in metrics_data.make_captions(rng, count):
    words = cap.split(" ")
    for _ in range(rng.randint(0, 4)):
      j = rng.randrange(len(words))
      if rng.random() < 0.4:
        words[j] += rng.choice(GLUE)
      else:
        words.insert(j, rng.choice(INSERTS))
    out.append(" ".join(words))
  return out


def make_sets(seed, num_images, refs_per_image=(1, 5)):
  """(gts raw {id: [captions]}, res raw {id: caption}) with overlap between them."""
  rng = random.Random(seed)
  gts, res = {}, {}
  for i in range(num_images):
    refs = perturbed_captions(rng, rng.randint(*refs_per_image))
    gts[i] = refs
    r = rng.random()
    if r < 0.25:
      res[i] = rng.choice(refs)
    elif r < 0.3:
      res[i] = ""
    else:
      res[i] = perturbed_captions(rng, 1)[0]
  return gts, res


def coco_tokenize(captions_for_image):
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  return PTBTokenizer().tokenize(
      {k: [{"caption": c} for c in v] for k, v in captions_for_image.items()})


@pytest.fixture(scope="module")
def tokenized_sets():
  """Scored sets tokenized by our tokenizer (Java-free)."""
  gts, res = make_sets(0, 150)
  return metrics.tokenize(gts), {k: [v[0]] for k, v in
                                  metrics.tokenize({k: [c] for k, c in res.items()}).items()}


# ------------------------------------------------------------------ tokenizer
@needs_java
def test_tokenizer_matches_ptbtokenizer():
  rng = random.Random(1)
  caps = (metrics_data.TRICKY_CAPTIONS + metrics_data.make_captions(rng, 150)
          + perturbed_captions(rng, 400) + ["", "   ", "line\nbreak inside"])
  rng.shuffle(caps)
  data = {i: [c] for i, c in enumerate(caps)}
  expected = coco_tokenize(data)
  ours = metrics.tokenize(data)
  bad = [(caps[i], expected[i][0], ours[i][0]) for i in data if expected[i] != ours[i]]
  assert not bad, f"{len(bad)} mismatches, first: {bad[:3]}"


def test_tokenizer_examples():
  got = tokenizer.tokenize_captions([
      "A man's dog isn't running.", 'He said "hello" (twice).', "Cannot stop, U.S. A-OK!"])
  assert got == ["a man 's dog is n't running", "he said hello -lrb- twice -rrb-",
                 "can not stop u.s. a-ok"]


# ------------------------------------------------------------------ scorers
def test_bleu_matches_pycocoevalcap(tokenized_sets):
  from pycocoevalcap.bleu.bleu import Bleu
  gts, res = tokenized_sets
  ref, ref_per = Bleu(4).compute_score(gts, res, verbose=0)
  ours, ours_per = metrics.compute_bleu(gts, res)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
  np.testing.assert_allclose(np.array(ours_per), np.array(ref_per), rtol=0, atol=TOL)


def test_rouge_matches_pycocoevalcap(tokenized_sets):
  from pycocoevalcap.rouge.rouge import Rouge
  gts, res = tokenized_sets
  ref, ref_per = Rouge().compute_score(gts, res)
  ours, ours_per = metrics.compute_rouge(gts, res)
  assert abs(ours - ref) < TOL
  np.testing.assert_allclose(ours_per, ref_per, rtol=0, atol=TOL)


def test_cider_matches_pycocoevalcap(tokenized_sets):
  from pycocoevalcap.cider.cider import Cider
  gts, res = tokenized_sets
  ref, ref_per = Cider().compute_score(gts, res)
  ours, ours_per = metrics.compute_cider(gts, res)
  assert abs(ours - ref) < TOL
  np.testing.assert_allclose(ours_per, ref_per, rtol=0, atol=TOL)
  assert np.ptp(ours_per) > 0.5  # the comparison is not between constants


def test_cider_batched_candidates_and_token_ids(tokenized_sets):
  from pycocoevalcap.cider.cider import Cider
  gts, _ = tokenized_sets
  rng = random.Random(3)
  keys = list(gts)
  num_cands = 3
  cands = [[rng.choice(gts[rng.choice(keys)]) if rng.random() < 0.5 else
            " ".join(rng.sample("a dog man the zzz qqq in on red ball runs".split(), 4))
            for _ in range(num_cands)] for _ in keys]
  scorer = metrics.CiderD(gts)
  ours = scorer.score(keys, cands)
  assert ours.shape == (len(keys), num_cands)
  for j in range(num_cands):
    _, ref = Cider().compute_score(gts, {k: [cands[i][j]] for i, k in enumerate(keys)})
    np.testing.assert_allclose(ours[:, j], ref, rtol=0, atol=TOL)
  # Token ids through a model vocabulary, padded with 0 after the end.
  vocab = ["<pad>"] + sorted({w for cs in cands for c in cs for w in c.split()})
  index = {w: i for i, w in enumerate(vocab)}
  length = max(len(c.split()) for cs in cands for c in cs) + 2
  ids = np.zeros((len(keys), num_cands, length), np.int32)
  for i, cs in enumerate(cands):
    for j, c in enumerate(cs):
      row = [index[w] for w in c.split()]
      ids[i, j, :len(row)] = row
      ids[i, j, len(row) + 1:] = 1  # junk after the first pad is ignored
  by_ids = metrics.CiderD(gts, vocab=vocab).score(keys, ids)
  np.testing.assert_allclose(by_ids, ours, rtol=0, atol=1e-12)


@needs_java
def test_score_matches_pycocoevalcap_end_to_end(meteor_on):
  """Raw text in: tokenization + all four metrics, corpus and per image."""
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.rouge.rouge import Rouge
  gts_raw, res_raw = make_sets(7, 60)
  corpus, per_image, keys = metrics.score_per_image(gts_raw, res_raw)
  gts = coco_tokenize(gts_raw)
  res = coco_tokenize({k: [c] for k, c in res_raw.items()})
  gts = {k: gts[k] for k in keys}
  expected = {}
  b, bp = Bleu(4).compute_score(gts, res, verbose=0)
  for name, s, sp in zip(metrics.BLEU_KEYS, b, bp):
    expected[name] = (s, sp, TOL)
  s, sp = Rouge().compute_score(gts, res)
  expected["ROUGE_L"] = (s, sp, TOL)
  s, sp = Cider().compute_score(gts, res)
  expected["CIDEr"] = (s, sp, TOL)
  meteor = Meteor()
  s, sp = meteor.compute_score(gts, res)
  expected["METEOR"] = (s, sp, METEOR_TOL)
  assert set(corpus) == set(expected)
  for name, (s, sp, tol) in expected.items():
    assert abs(corpus[name] - s) < tol, name
    np.testing.assert_allclose(per_image[name], sp, rtol=0, atol=tol, err_msg=name)


def test_score_subset_and_errors(capsys):
  gts, res = make_sets(5, 20)
  out = metrics.score(gts, {k: res[k] for k in list(res)[:5]}, metrics=("bleu", "cider"))
  assert set(out) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
  with pytest.raises(KeyError, match="missing from gts"):
    metrics.score(gts, {"nope": "a dog"})
  with pytest.raises(ValueError, match="unknown 'blue'"):
    metrics.score(gts, res, metrics=("blue",))


def test_meteor_without_java_warns(monkeypatch, capsys, meteor_on):
  from captionjax.metrics import meteor
  monkeypatch.setattr(meteor.shutil, "which", lambda name: None)
  gts, res = make_sets(6, 10)
  out = metrics.score(gts, res, metrics=("meteor", "rouge"))
  assert "METEOR" not in out and "ROUGE_L" in out
  assert "METEOR needs Java" in capsys.readouterr().err


# ------------------------------------------------------------------ CLI
def _write(tmp_path, name, obj):
  path = tmp_path / name
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
  return str(path)


def test_cli_evaluate(tmp_path):
  gts, res = make_sets(9, 30)
  ann = {"images": [{"id": k} for k in gts],
         "annotations": [{"image_id": k, "id": j, "caption": c}
                         for k, cs in gts.items() for j, c in enumerate(cs)]}
  results = [{"image_id": k, "caption": c} for k, c in list(res.items())[:20]]
  results.append(dict(results[0]))  # duplicate id: warned, first kept
  ann_path = _write(tmp_path, "ann.json", ann)
  res_path = _write(tmp_path, "res.json", results)
  proc = subprocess.run(
      [sys.executable, "-m", "captionjax.cli", "evaluate", f"--annotations={ann_path}",
       f"--results={res_path}", "--metrics=bleu,rouge,cider"],
      capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "duplicate" in proc.stderr
  got = json.loads(proc.stdout)
  want = metrics.score(gts, {k: res[k] for k in list(res)[:20]},
                       metrics=("bleu", "rouge", "cider"))
  assert got.keys() == want.keys()
  for k in want:
    assert abs(got[k] - want[k]) < 1e-12


@pytest.mark.parametrize("ann, res, message", [
    ("{not json", [], "not valid JSON"),
    ({"images": []}, [], "'annotations' list"),
    ({"annotations": [{"image_id": 1}]}, [], "needs 'image_id' and 'caption'"),
    ({"annotations": [{"image_id": 1, "caption": "a dog"}]}, {"x": 1}, "JSON list"),
    ({"annotations": [{"image_id": 1, "caption": "a dog"}]},
     [{"image_id": 2, "caption": "a cat"}], "not in"),
    ({"annotations": [{"image_id": [1], "caption": "a dog"}]}, [], "image_id is a list"),
    ({"annotations": [{"image_id": 1, "caption": " "}, {"image_id": 1, "caption": ""}]},
     [{"image_id": 1, "caption": "a cat"}], "only empty reference"),
])
def test_cli_errors(tmp_path, capsys, ann, res, message):
  """Malformed input: one line naming the problem, exit 2, no traceback."""
  from captionjax import cli
  code = cli.main(["evaluate", f"--annotations={_write(tmp_path, 'a.json', ann)}",
                   f"--results={_write(tmp_path, 'r.json', res)}", "--metrics=bleu"])
  err = capsys.readouterr().err
  assert code == 2
  assert message in err and err.count("\n") == 1


def test_cli_no_metric_named(tmp_path, capsys):
  from captionjax import cli
  ann = _write(tmp_path, "a.json", {"annotations": [{"image_id": 1, "caption": "a dog"}]})
  res = _write(tmp_path, "r.json", [{"image_id": 1, "caption": "a dog"}])
  assert cli.main(["evaluate", f"--annotations={ann}", f"--results={res}", "--metrics=,"]) == 2
  assert "names no metric" in capsys.readouterr().err
