"""The ranking model: its score, loss and metrics against independent references,
the captioner as a ranker, training end to end, `captionjax rank` and its demo page.

Dimensions: N images, P regions, M sentences, T words, H joint space.
"""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from captionjax import ranking
from captionjax.models import ranking as ranking_lib
from conftest import parse_html as _parse


def _tokens(rng, m, t, vocab_size, min_words=1):
  """Words [M, T]: 1..vocab_size, then 0 padding (every sentence has min_words+)."""
  out = np.zeros((m, t), np.int32)
  for i in range(m):
    n = rng.integers(min_words, t + 1)
    out[i, :n] = rng.integers(1, vocab_size + 1, n)
  return out


def _random_params(module, rng, *args, scale=0.5):
  """Random parameters of `module`'s shapes (biases too; no initializer compiled)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]
  return jax.tree_util.tree_map(
      lambda x: (scale * rng.normal(size=x.shape)).astype(np.float32), shapes)


# ---------------------------------------------------------------- the score


def test_alignment_scores_match_numpy():
  rng = np.random.default_rng(0)
  n, p, m, t, h = 4, 9, 6, 7, 5
  regions = rng.normal(size=(n, p, h)).astype(np.float32)
  words = rng.normal(size=(m, t, h)).astype(np.float32)
  tokens = _tokens(rng, m, t, 20)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ranking_lib.alignment_scores(jnp.asarray(regions), jnp.asarray(words),
                                                  jnp.asarray(tokens)))
  want = np.zeros((m, n))
  for i in range(m):
    for j in range(n):
      for k in range(t):
        if tokens[i, k] > 0:
          want[i, j] += max(0.0, max(float(words[i, k] @ regions[j, q]) for q in range(p)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert (want > 0).all() and got.shape == (m, n)


def test_word_alignments_pick_each_words_best_region():
  rng = np.random.default_rng(1)
  regions = rng.normal(size=(3, 4, 5)).astype(np.float32)
  words = rng.normal(size=(3, 6, 5)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    score, region = ranking_lib.word_alignments(jnp.asarray(regions), jnp.asarray(words))
  dots = np.einsum("kth,kph->ktp", words, regions)
  np.testing.assert_array_equal(np.asarray(region), dots.argmax(-1))
  np.testing.assert_allclose(np.asarray(score), np.maximum(dots.max(-1), 0), rtol=1e-5, atol=1e-6)


def test_sentence_rnn_matches_numpy_recurrence():
  """The BRNN (two lax.scans) against the recurrences written out in numpy,
  the backward one starting at each sentence's last word."""
  rng = np.random.default_rng(2)
  v, e, h, m, t = 12, 4, 6, 5, 7
  tokens = _tokens(rng, m, t, v)
  tokens[0, :] = rng.integers(1, v + 1, t)  # one sentence without padding
  rnn = ranking_lib.SentenceRNN(v, e, h)
  params = _random_params(rnn, rng, jnp.asarray(tokens))  # biases non-zero: tested too
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(rnn.apply)({"params": params}, jnp.asarray(tokens)))
  p = jax.tree_util.tree_map(np.asarray, params)
  relu = lambda x: np.maximum(x, 0)
  want = np.zeros((m, t, h))
  for i in range(m):
    n = int((tokens[i] > 0).sum())
    x = p["embed"]["embedding"][tokens[i, :n]]  # -> [n, E]
    ee = relu(x @ p["e"]["kernel"] + p["e"]["bias"])
    f, b = np.zeros((n, h)), np.zeros((n, h))
    for k in range(n):
      f[k] = relu(ee[k] + (f[k - 1] if k else np.zeros(h)) @ p["w_f"] + p["b_f"])
    for k in reversed(range(n)):
      b[k] = relu(ee[k] + (b[k + 1] if k + 1 < n else np.zeros(h)) @ p["w_b"] + p["b_b"])
    want[i, :n] = relu((f + b) @ p["out"]["kernel"] + p["out"]["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_chunked_scorer_equals_one_pass():
  """All M x N scores in chunks of sentences (lax.map, padded M) = one direct pass."""
  rng = np.random.default_rng(3)
  model = ranking_lib.AlignmentModel(vocab_size=15, regions=4, embed_size=8, features=8)
  feats = rng.random((6, 4 * 3)).astype(np.float32)  # 6 images, 4 regions of 3
  tokens = _tokens(rng, 11, 5, 15)
  params = _random_params(model, rng, feats[:1], jnp.zeros((1, 1, 7), jnp.int32))

  @jax.jit
  def one_pass(params, feats, tokens):
    regions = model.apply({"params": params}, feats, method=model.embed_images)
    words = model.apply({"params": params}, tokens, method=model.embed_sentences)
    return ranking_lib.alignment_scores(regions, words, tokens)

  with jax.default_matmul_precision("highest"):
    want = np.asarray(one_pass(params, feats, tokens))
    got = np.asarray(jax.jit(ranking.alignment_scorer(model, 4))(
        params, feats, ranking._pad_rows(tokens, 4)))[:11]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the loss


def test_max_margin_loss_matches_brute_force():
  rng = np.random.default_rng(4)
  n, s, margin = 5, 3, 0.7
  scores = rng.normal(size=(n * s, n)).astype(np.float32)
  image_of = np.arange(n * s) // s
  valid = np.array([1, 1, 0, 1, 1], np.float32)  # image 2 is padding
  loss = jax.jit(ranking_lib.max_margin_loss, static_argnums=2)
  got, count = loss(jnp.asarray(scores), jnp.asarray(image_of), margin, jnp.asarray(valid))
  want, pairs = 0.0, 0
  for m in range(n * s):
    k = image_of[m]
    if not valid[k]:
      continue
    pairs += 1
    for j in range(n):  # other images for this sentence
      if j != k and valid[j]:
        want += max(0.0, margin + scores[m, j] - scores[m, k])
    for m2 in range(n * s):  # other images' sentences for this image
      if image_of[m2] != k and valid[image_of[m2]]:
        want += max(0.0, margin + scores[m2, k] - scores[m, k])
  assert float(count) == pairs == 12
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  full, full_count = loss(jnp.asarray(scores), jnp.asarray(image_of), margin)
  assert float(full_count) == n * s and float(full) > float(got)


def test_loss_gradient_is_finite_differences():
  """d loss / d scores, where it is smooth, is what the hinge terms say."""
  rng = np.random.default_rng(5)
  scores = rng.normal(size=(6, 3)).astype(np.float64)
  image_of = np.arange(6) // 2
  with jax.enable_x64(True):
    f = jax.jit(lambda x: ranking_lib.max_margin_loss(x, jnp.asarray(image_of))[0])
    g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(scores)))
    eps = 1e-6
    for idx in [(0, 0), (1, 2), (4, 1), (5, 2)]:
      d = np.zeros_like(scores)
      d[idx] = eps
      fd = (float(f(jnp.asarray(scores + d))) - float(f(jnp.asarray(scores - d)))) / (2 * eps)
      assert abs(fd - g[idx]) < 1e-4, (idx, fd, g[idx])


# ---------------------------------------------------------------- R@K


def test_ranks_and_recall_on_a_hand_made_matrix():
  # 3 images, sentences 0,1 -> image 0, 2 -> image 1, 3,4 -> image 2.
  image_of = np.array([0, 0, 1, 2, 2])
  scores = np.array([
      [9, 1, 2],  # image rank 1
      [5, 5, 2],  # a tie with image 1 counts against the truth -> rank 2
      [3, 4, 8],  # image 1 second -> rank 2
      [0, 0, 7],  # rank 1
      [6, 9, 1],  # rank 3
  ], np.float32)
  sentence_rank, image_rank = ranking.ranks(scores, image_of)
  np.testing.assert_array_equal(image_rank, [1, 2, 2, 1, 3])
  # image 0: its best sentence scores 9, nothing else reaches it -> 1.
  # image 1: its sentence 2 scores 4; sentences 4 (9) and 1 (5) are above -> 3.
  # image 2: its best is sentence 3 (7); sentence 2 (8) above -> 2.
  np.testing.assert_array_equal(sentence_rank, [1, 3, 2])
  m = ranking.retrieval_metrics(scores, image_of)
  assert m["image_retrieval"] == {"R@1": 40.0, "R@5": 100.0, "R@10": 100.0, "median_rank": 2.0}
  assert m["sentence_retrieval"] == {"R@1": 33.33, "R@5": 100.0, "R@10": 100.0,
                                     "median_rank": 2.0}
  flat = ranking.flat(m)
  assert flat["image_R@1"] == 40.0 and flat["rsum"] == pytest.approx(40 + 33.33 + 4 * 100)


def test_random_ranker_is_at_chance():
  """Random scores: image R@K ~ K / N, the check that the metric is not optimistic."""
  rng = np.random.default_rng(6)
  n, s = 200, 5
  image_of = np.repeat(np.arange(n), s)
  m = ranking.retrieval_metrics(rng.random((n * s, n)), image_of)
  assert abs(m["image_retrieval"]["R@10"] - 5.0) < 1.5
  assert abs(m["image_retrieval"]["median_rank"] - n / 2) < 15
  # Best of 5 ground-truth sentences among 1,000: P(rank <= 10) ~ 1 - (1 - 10/1000)^5.
  assert abs(m["sentence_retrieval"]["R@10"] - 100 * (1 - 0.99 ** 5)) < 3.5
  # The same with every score tied: ties count against the ground truth.
  tied = ranking.retrieval_metrics(np.zeros((n * s, n)), image_of)
  assert tied["image_retrieval"]["R@10"] == 0.0 and tied["sentence_retrieval"]["R@10"] == 0.0


# ---------------------------------------------------------------- the captioner as a ranker


def _pair_by_pair(model, images, tokens):
  """[M, N]: each sentence's mean log P of its words and END under each image,
  the LM teacher-forced pair by pair (inference.token_log_probs)."""
  from captionjax import inference
  (m, t), n = tokens.shape, len(images)
  caps = np.broadcast_to(ranking.caption_buffer(tokens)[None], (n, m, t + 2))
  logp = inference.token_log_probs(model, images, caps)
  counted = (tokens > 0).sum(-1) + 1
  return np.array([[logp[j, i, :counted[i]].mean() for j in range(n)] for i in range(m)])


def test_generative_scores_are_mean_token_log_probs(shapes_dir):
  """The chunked M x N program = log P of each sentence's words and END under
  the LM run pair by pair, divided by their number."""
  from captionjax import inference
  from captionjax import vocab as vocab_lib
  from conftest import tiny_config
  config = tiny_config(shapes_dir)
  vocab = vocab_lib.Vocabulary.load(shapes_dir)
  model = inference.random_model(config, vocab, 64, 16)
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  tokens = _tokens(rng, 5, 16, len(vocab))
  r = ranking.Ranker(model)
  feats = r.features(images)
  with jax.default_matmul_precision("highest"):
    got = ranking.Ranker(model, chunk_bytes=1).score(feats, tokens)  # chunks of 1 sentence
    want = _pair_by_pair(model, images, tokens)
  assert got.shape == (5, 3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  blank = ranking.Ranker(model, prior="blank")
  with jax.default_matmul_precision("highest"):
    diff = blank.score(feats, tokens) - got
    prior = blank.blank_scores(ranking.caption_buffer(tokens))
  np.testing.assert_allclose(diff, -np.broadcast_to(prior[:, None], (5, 3)), rtol=1e-4, atol=1e-4)
  assert np.ptp(prior) > 0  # one value per sentence


@pytest.mark.parametrize("overrides", [
    {},  # the default: an LSTM attending over 3 x 3 regions
    {"model.attention": False, "model.rnn_type": "rnn", "model.num_layers": 2},
    {"model.attention": False, "model.image_every_step": True},
])
def test_generative_scores_in_chunks_of_mixed_lengths(shapes_dir, overrides):
  """Chunks of 3 sentences of mixed lengths (run sorted by length) = each pair
  teacher-forced on its own, for each kind of LM the pair step handles."""
  from captionjax import inference
  from captionjax import vocab as vocab_lib
  from conftest import tiny_config
  vocab = vocab_lib.Vocabulary.load(shapes_dir)
  model = inference.random_model(tiny_config(shapes_dir, **overrides), vocab, 64, 16)
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
  tokens = _tokens(rng, 7, 16, len(vocab))
  r = ranking.Ranker(model)
  r.chunk_bytes = 3 * r._per_sentence_bytes(4, 16, None)  # pylint: disable=protected-access
  with jax.default_matmul_precision("highest"):
    got = r.score(r.features(images), tokens)
    want = _pair_by_pair(model, images, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- training and `captionjax rank`


def _read(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _chance(n: int, m: int, per_image: int = 5) -> dict:
  """A random ranker's expected R@K: image search K / N; sentence search, the
  chance that one of an image's sentences is among the top K of M."""
  out = {}
  for k in ranking.KS:
    miss = np.prod([(m - per_image - i) / (m - i) for i in range(k)])
    out[f"image_R@{k}"], out[f"sentence_R@{k}"] = 100.0 * k / n, 100.0 * (1 - miss)
  out["rsum"] = sum(out.values())
  return out


def test_trained_alignment_model_beats_a_random_ranker(ranking_workdir, tmp_path):
  """`captionjax train --config=ranking` on the tiny set (96 training images):
  ranking.json; on the held-out test split far above a random ranker, and its
  own training images nearly all found."""
  from captionjax import cli
  out = _read(os.path.join(ranking_workdir, "ranking.json"))
  assert (out["num_images"], out["num_sentences"]) == (20, 100)
  chance, got = _chance(20, 100), ranking.flat(out)
  assert got["rsum"] >= 1.5 * chance["rsum"], (got, chance)
  assert got["image_R@5"] >= 1.6 * chance["image_R@5"], (got, chance)
  assert got["image_median_rank"] <= 6, got
  train = tmp_path / "train.json"
  assert cli.main(["rank", f"--checkpoint={ranking_workdir}", "--split=train",
                   "--num_images=20", f"--output={train}"]) == 0
  fit = ranking.flat(_read(train))
  for k in ("image_R@5", "sentence_R@5"):
    assert fit[k] >= 3 * chance[k], (fit, chance)
  log = [json.loads(line) for line in open(os.path.join(ranking_workdir, "train_log.jsonl"))]
  assert {"cnn_pretrain", "ranking", "val", "test"} <= {r.get("phase") for r in log}
  assert _read(os.path.join(ranking_workdir, "config.json"))["model"]["kind"] == "ranking"
  assert not os.path.exists(os.path.join(ranking_workdir, "captions.json"))


def test_rank_command_and_demo_page(ranking_workdir, tmp_path):
  """`captionjax rank` on the split gives the training run's final numbers; the
  page has each sentence's top 5 and the missed ground truth, and draws in
  Chromium with the alignment overlay of the deep-linked image."""
  from captionjax import cli
  out = tmp_path / "ranking.json"
  page_dir = tmp_path / "page"
  rc = cli.main(["rank", f"--checkpoint={ranking_workdir}", "--split=test",
                 f"--output={out}", f"--html={page_dir}"])
  assert rc == 0
  got, final = _read(out), _read(os.path.join(ranking_workdir, "ranking.json"))
  for key in ("sentence_retrieval", "image_retrieval", "num_images", "num_sentences"):
    assert got[key] == final[key]
  text = open(page_dir / "index.html", encoding="utf-8").read()
  page = _parse(text)
  figures = [a for t, a in page.attrs if t == "figure"]
  queries = [a for t, a in page.attrs if t == "div" and "query" in (a.get("class") or "")]
  assert len(queries) == 100
  correct = sum("correct" in f["class"] for f in figures)
  missed = sum("missed" in f["class"] for f in figures)
  # Every sentence shows its ground truth: in the top 5 (green) or after them (yellow).
  assert correct + missed == 100 and len(figures) == 500 + missed
  assert correct == round(got["image_retrieval"]["R@5"])
  annotated = [a["class"] for t, a in page.attrs if t == "img"
               and a.get("class") in ("correct", "missed")]
  assert len(annotated) == 20
  assert annotated.count("correct") == round(got["sentence_retrieval"]["R@5"] * 20 / 100)
  words = json.loads(queries[0]["data-words"])
  align = json.loads(figures[0]["data-align"])
  assert len(align) == len(words) and all(0 <= a[0] < 9 for a in align)
  thumbs = sorted(os.listdir(page_dir / "thumbs"))
  assert thumbs and all(("thumbs/" + t) in text for t in thumbs)

  shot = _screenshot(page_dir / "index.html", "#q0/0", tmp_path)
  px = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(shot).convert("RGB"))
  px = px.astype(int)
  green = (px[..., 1] > 140) & (px[..., 0] < 60) & (px[..., 2] < 110)
  red = (px[..., 0] > 190) & (px[..., 1] < 60) & (px[..., 2] < 60)
  overlay = (px[..., 0] > 230) & (px[..., 1] > 190) & (px[..., 2] < 60)  # the region's outline
  assert red.sum() > 2000, "no red border painted"
  assert overlay.sum() > 100, "the alignment overlay was not drawn"
  if "correct" in figures[0]["class"]:
    assert green.sum() > 500


def _screenshot(page, fragment, tmp_path):
  from test_gallery import _run_chromium  # pylint: disable=g-import-not-at-top
  shot = tmp_path / "shot.png"
  with tempfile.TemporaryDirectory() as user_dir:
    _run_chromium(["--window-size=1100,800", f"--screenshot={shot}",
                   "file://" + os.path.abspath(page) + fragment], user_dir)
  return shot


HOSTILE = "<script>alert(1)</script> & \"q\" 'a'"


def test_page_escapes_everything():
  from captionjax import rank_page
  queries = [{"words": [HOSTILE, "red"], "image_id": 1, "hits": [
      {"image_id": 1, "score": 2.5, "rank": 1, "correct": True, "align": [[0, 1.5], [8, 0.25]]},
      {"image_id": 2, "score": 1.0, "rank": 2, "correct": False, "align": None}],
      "missed": None}]
  images = [{"image_id": 2, "file_name": HOSTILE + ".png", "sentences": [
      {"text": HOSTILE, "score": 1.0, "rank": 1, "correct": False}],
             "missed": {"text": "a red circle", "score": 0.5, "rank": 7, "correct": True}}]
  result = {k: {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0, "median_rank": 4.0}
            for k in ("sentence_retrieval", "image_retrieval")}
  text = rank_page.render(queries, images, result, grid=3, title=HOSTILE, summary=HOSTILE)
  page = _parse(text)
  tags = [t for t, _ in page.attrs]
  assert tags.count("script") == 1  # the page's own
  assert "<script>alert" not in text
  assert page.texts["summary"] == [HOSTILE]
  assert page.texts["text"] == [HOSTILE, "a red circle"]
  assert page.texts["file"] == [HOSTILE + ".png"]
  q = [a for t, a in page.attrs if t == "div" and a.get("id") == "q0"][0]
  assert json.loads(q["data-words"]) == [HOSTILE, "red"]
  lis = [a for t, a in page.attrs if t == "li"]
  assert [(a["class"], a["value"]) for a in lis] == [("wrong", "1"), ("missed", "7")]


def test_queries(ranking_workdir, shapes_dir, tmp_path, capsys):
  """--images/--query lists the top images with each word's grounding;
  --image/--sentences the top sentences; both consistent with the split's scores."""
  from captionjax import cli
  from captionjax import input_pipeline
  from PIL import Image
  data = input_pipeline.load_split(shapes_dir, "test")
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i in range(6):
    Image.fromarray(data.images[i]).save(folder / f"{i}.png")
  (folder / "notes.txt").write_text("not an image")
  (folder / "broken.png").write_bytes(b"\x89PNG broken")
  out = tmp_path / "q.json"
  rc = cli.main(["rank", f"--checkpoint={ranking_workdir}", f"--images={folder}",
                 "--query=a red zorblax", "--top=3", f"--output={out}"])
  assert rc == 0
  res = _read(out)
  assert res["images"] == 6 and len(res["results"]) == 3
  scores = [r["score"] for r in res["results"]]
  assert scores == sorted(scores, reverse=True)
  for r in res["results"]:
    assert [w["word"] for w in r["words"]] == ["a", "red", "UNK"]
    assert all(0 <= w["region"] < 9 and w["score"] >= 0 for w in r["words"])
    assert abs(sum(w["score"] for w in r["words"]) - r["score"]) < 1e-3
  err = capsys.readouterr().err
  assert "zorblax" in err and "broken.png" in err

  sentences = tmp_path / "s.txt"
  sentences.write_text("a red circle\n\na big blue square on the left\nthree shapes\n")
  rc = cli.main(["rank", f"--checkpoint={ranking_workdir}", f"--image={folder / '0.png'}",
                 f"--sentences={sentences}", f"--output={out}"])
  assert rc == 0
  res = _read(out)
  assert res["sentences"] == 3 and len(res["results"]) == 3
  assert sorted(r["sentence"] for r in res["results"]) == sorted(
      ["a red circle", "a big blue square on the left", "three shapes"])


def test_bad_input_is_one_line(ranking_workdir, trained_workdir, tmp_path, capsys):
  from captionjax import cli
  cases = [
      (["--images=" + str(tmp_path)], "--images and --query go together"),
      ([f"--image={tmp_path / 'none.png'}", f"--sentences={tmp_path / 'none.txt'}"],
       "none.txt"),
      (["--prior=blank"], "for a captioner"),
      (["--num_images=0"], "--num_images=0"),
  ]
  for extra, want in cases:
    assert cli.main(["rank", f"--checkpoint={ranking_workdir}", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
  # caption and perplexity refuse the ranking model, naming `captionjax rank`.
  from PIL import Image
  Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
  for cmd in (["caption", f"--images={tmp_path / 'x.png'}"], ["perplexity"]):
    assert cli.main([cmd[0], f"--checkpoint={ranking_workdir}", *cmd[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "captionjax rank" in err[0], err


def test_start_from_a_captioner_takes_its_cnn(trained_workdir, shapes_dir):
  """--start_from=a captioner run gives a ranking run its CNN (and nothing else);
  a CNN of another shape is refused, naming the field."""
  from captionjax import checkpoints
  from captionjax import vocab as vocab_lib
  from captionjax.models import build
  from conftest import tiny_ranking_config
  vocab = vocab_lib.Vocabulary.load(shapes_dir)
  config = tiny_ranking_config(shapes_dir)
  cnn, model, _ = build.make_models(config, len(vocab))
  params, bs, _ = build.init_params(config, cnn, model, 64, 16, jax.random.PRNGKey(0),
                                    jax.random.PRNGKey(1))
  got, got_bs = checkpoints.load_start_from(trained_workdir, config, vocab, params, bs,
                                            say=lambda m: None)
  src = checkpoints.Checkpointer(trained_workdir, keep=10**6)
  saved = src.restore(src.latest_step(), None)
  src.close()
  same = lambda a, b: jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))
  assert same(got["cnn"], saved["params"]["cnn"]) and same(got_bs, saved["batch_stats"])
  assert not same(params["cnn"], saved["params"]["cnn"])
  for k in ranking_lib.SCORE_KEYS:
    assert same(got[k], params[k])
  other = tiny_ranking_config(shapes_dir, model__cnn_kwargs__widths=(8, 16, 16))
  with pytest.raises(checkpoints.CheckpointError, match="model.cnn_kwargs.widths"):
    checkpoints.load_start_from(trained_workdir, other, vocab, params, bs, say=lambda m: None)


def test_captioner_as_ranker(trained_workdir, tmp_path):
  """The generative baseline through `captionjax rank`, with and without the prior."""
  from captionjax import cli
  for prior in ("none", "blank"):
    out = tmp_path / f"{prior}.json"
    assert cli.main(["rank", f"--checkpoint={trained_workdir}", "--num_images=10",
                     f"--prior={prior}", f"--output={out}"]) == 0
    res = _read(out)
    assert res["model"] == "captioner" and (res["num_images"], res["num_sentences"]) == (10, 50)
    assert ("blank" in res["score"]) == (prior == "blank")
    for d in ("sentence_retrieval", "image_retrieval"):
      assert set(res[d]) == {"R@1", "R@5", "R@10", "median_rank"}
  # Subtracting a per-sentence constant leaves image search unchanged.
  a, b = _read(tmp_path / "none.json"), _read(tmp_path / "blank.json")
  assert a["image_retrieval"] == b["image_retrieval"]
