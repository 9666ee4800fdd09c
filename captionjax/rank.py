"""`captionjax rank`: grounded image-sentence retrieval with a trained checkpoint.

    captionjax rank --checkpoint=WORKDIR [--split=test] [--num_images=1000] \\
        [--prior=none|blank] [--output=FILE] [--html=DIR] [--html_max=N]
    captionjax rank --checkpoint=WORKDIR --images=FOLDER --query="a red circle on the left"
    captionjax rank --checkpoint=WORKDIR --image=FILE --sentences=FILE

The checkpoint is the alignment model (`captionjax train --config=ranking`)
or a captioner used as a ranker: score = log P(sentence | image) per token
(words and END), minus that under a blank image with --prior=blank.

With a split: the first --num_images images and all their sentences, every
sentence scored against every image; prints R@1, R@5, R@10 and the median
rank both ways and writes them to --output (default WORKDIR/ranking.json):
{"num_images", "num_sentences", "sentence_retrieval": {"R@1", "R@5", "R@10",
"median_rank"}, "image_retrieval": {...}, "model", "score", "seconds", ...}.
"Sentence retrieval" is image annotation (an image queries the sentences),
"image retrieval" image search (a sentence queries the images); R@K in
percent. --html writes the demo page (rank_page.py).

--query lists the top --top images of the folder for the sentence, with each
word's grounding score and best region (the alignment model); --sentences
(one sentence a line) lists the top sentences for --image. --output then
writes them as JSON. Exit status: 0 done, 2 bad input.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

EXIT_OK, EXIT_USAGE = 0, 2


class UsageError(ValueError):
  """A bad command line or input (exit status 2)."""


def add_arguments(p):
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n", 1)[1]
  p.add_argument("--checkpoint", required=True, help="a `captionjax train` workdir")
  p.add_argument("--step", type=int, default=None, help="a checkpoint step instead of the latest")
  p.add_argument("--split", default="test", help="the split to rank (without --images/--image)")
  p.add_argument("--data", default="",
                 help="a prepro output directory (default: the checkpoint's training data set)")
  p.add_argument("--num_images", type=int, default=1000,
                 help="rank the split's first N images and their sentences (-1 = all)")
  p.add_argument("--prior", choices=("none", "blank"), default="none",
                 help="a captioner: subtract each sentence's log-probability under a blank image")
  p.add_argument("--output", default="",
                 help="JSON results (default with a split: WORKDIR/ranking.json; else none)")
  p.add_argument("--html", default="", metavar="DIR", help="also write the demo page there")
  p.add_argument("--html_max", type=int, default=-1,
                 help="the page shows the first N sentences and N images (-1 = all)")
  p.add_argument("--top", type=int, default=5, help="results listed per query")
  p.add_argument("--images", help="a folder of images to search with --query")
  p.add_argument("--query", help="a sentence to search --images with")
  p.add_argument("--image", help="an image to annotate with --sentences")
  p.add_argument("--sentences", help="a text file, one sentence a line")
  p.add_argument("--batch_size", type=int, default=100, help="images per CNN batch")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")


def _say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
  from captionjax import inference  # pylint: disable=g-import-not-at-top
  try:
    _check_args(args)
    try:
      model = inference.load_workdir(args.checkpoint, args.step, kinds=None)
    except inference.CheckpointError as e:
      raise UsageError(str(e)) from None
    from captionjax import ranking  # pylint: disable=g-import-not-at-top
    try:
      ranker = ranking.Ranker(model, prior=args.prior, progress=not args.no_progress)
    except ValueError as e:
      raise UsageError(str(e)) from None
    if args.query is not None:
      return run_query(args, ranker)
    if args.sentences is not None:
      return run_sentences(args, ranker)
    return run_split(args, ranker)
  except UsageError as e:
    _say(f"captionjax rank: error: {e}")
    return EXIT_USAGE


def _check_args(args) -> None:
  if (args.images is None) != (args.query is None):
    raise UsageError("--images and --query go together")
  if (args.image is None) != (args.sentences is None):
    raise UsageError("--image and --sentences go together")
  if args.query is not None and args.sentences is not None:
    raise UsageError("give --images/--query or --image/--sentences, not both")
  if args.top < 1:
    raise UsageError(f"--top={args.top}: must be >= 1")
  if args.batch_size < 1:
    raise UsageError(f"--batch_size={args.batch_size}: must be >= 1")
  if args.num_images == 0 or args.num_images < -1:
    raise UsageError(f"--num_images={args.num_images}: must be -1 (all) or positive")
  if args.html and (args.query is not None or args.sentences is not None):
    raise UsageError("--html is for a split (drop --query/--sentences)")
  if args.output and os.path.isdir(args.output):
    raise UsageError(f"--output={args.output}: is a folder, give a file name")


def region_name(p: int, grid: int) -> str:
  """Where region p (row-major in a G x G grid) is, in words."""
  if grid <= 1:
    return "the whole image"
  return f"row {p // grid + 1}, column {p % grid + 1} of {grid}x{grid}"


def grid_of(ranker) -> int:
  """G, the regions being G x G cells (1: one region, or a captioner)."""
  if ranker.kind != "ranking":
    return 1
  g = int(round(ranker.model.lm.regions ** 0.5))
  return g if g * g == ranker.model.lm.regions else 1


# ---------------------------------------------------------------- a split


def run_split(args, ranker) -> int:
  from captionjax import input_pipeline  # pylint: disable=g-import-not-at-top
  from captionjax import ranking  # pylint: disable=g-import-not-at-top
  model = ranker.model
  try:
    data_dir = args.data or input_pipeline.data_dir_for(model.config)
    data = input_pipeline.load_split(data_dir, args.split)
  except (OSError, ValueError) as e:
    raise UsageError(str(e).splitlines()[0]) from None
  if data.image_size != model.image_size:
    raise UsageError(f"{data_dir}: images of {data.image_size} px, the model's are "
                     f"{model.image_size} px")
  num = None if args.num_images < 0 else args.num_images
  t0 = time.time()
  result, scores, tokens, image_of, feats = ranking.rank_split(ranker, data, num, args.batch_size)
  result.update(split=args.split, step=model.step, checkpoint=args.checkpoint)
  if num is not None and num > result["num_images"]:
    _say(f"note: the split has {result['num_images']} images (asked for {num})")
  ranking.print_table(result, print)
  output = args.output or os.path.join(args.checkpoint, ranking.FILE)
  try:
    ranking.write_result(output, result)
    _say(f"results: {output} ({time.time() - t0:.1f}s in all)")
    if args.html:
      path = write_demo(args, ranker, data, result, scores, tokens, image_of, feats)
      _say(f"demo page: {path}")
  except OSError as e:
    raise UsageError(f"cannot write {e.filename}: {e.strerror}") from None
  return EXIT_OK


def _top(scores: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
  """The k best of a row's scores, ties ordered with the ground truth last (as
  ranking.ranks counts them: a ground truth shown in the top k has rank <= k)."""
  return np.lexsort((truth, -scores))[:k]


def demo_content(ranker, data, scores, tokens, image_of, feats, top: int = 5,
                 max_items: int = -1):
  """(queries, images) for rank_page.render: each sentence's top images (with the
  ground truth when missed) and word alignments, each image's top sentences."""
  from captionjax import ranking  # pylint: disable=g-import-not-at-top
  words_of = ranker.model.vocab.words
  m, n = scores.shape
  sentence_rank, image_rank = ranking.ranks(scores, image_of)
  top = min(top, n)
  shown_m = m if max_items < 0 else min(m, max_items)
  shown_n = n if max_items < 0 else min(n, max_items)
  figures = []  # per sentence: [(image, rank)], the top ones then the missed ground truth
  for i in range(shown_m):
    best = _top(scores[i], np.arange(n) == image_of[i], top)
    figures.append([(int(j), r + 1) for r, j in enumerate(best)])
    if image_of[i] not in best:
      figures[-1].append((int(image_of[i]), int(image_rank[i])))
  pm = np.array([i for i, f in enumerate(figures) for _ in f], np.int64)
  pn = np.array([j for f in figures for j, _ in f], np.int64)
  aligned = ranker.groundings(feats[pn], tokens[pm]) if len(pm) else None
  texts = [[words_of[t - 1] for t in row if t > 0] for row in tokens]
  queries, k = [], 0
  for i, figs in enumerate(figures):
    hits = []
    for j, rank in figs:
      align = None
      if aligned is not None:
        align = [[int(aligned[1][k, t]), round(float(aligned[0][k, t]), 3)]
                 for t in range(len(texts[i]))]
      hits.append({"image_id": int(data.image_id[j]), "score": float(scores[i, j]),
                   "rank": rank, "correct": j == image_of[i], "align": align})
      k += 1
    queries.append({"words": texts[i], "image_id": int(data.image_id[image_of[i]]),
                    "hits": hits[:top], "missed": hits[top] if len(hits) > top else None})
  images = []
  for j in range(shown_n):
    col, own = scores[:, j], image_of == j
    best = _top(col, own, top)
    sents = [{"text": " ".join(texts[i]), "score": float(col[i]), "rank": r + 1,
              "correct": bool(own[i])} for r, i in enumerate(best)]
    missed = None
    if not own[best].any():
      i = int(np.flatnonzero(own)[np.argmax(col[own])])
      missed = {"text": " ".join(texts[i]), "score": float(col[i]),
                "rank": int(sentence_rank[j]), "correct": True}
    images.append({"image_id": int(data.image_id[j]), "file_name": data.file_name[j],
                   "sentences": sents, "missed": missed})
  return queries, images


def write_demo(args, ranker, data, result, scores, tokens, image_of, feats) -> str:
  from captionjax import images as images_lib  # pylint: disable=g-import-not-at-top
  from captionjax import rank_page  # pylint: disable=g-import-not-at-top
  from captionjax import ranking  # pylint: disable=g-import-not-at-top
  queries, images = demo_content(ranker, data, scores, tokens, image_of, feats, args.top,
                                 args.html_max)
  shown = {q["image_id"] for q in queries} | {h["image_id"] for q in queries for h in q["hits"]}
  shown |= {im["image_id"] for im in images}
  row_of = {int(iid): i for i, iid in enumerate(data.image_id[:result["num_images"]])}
  pix = ranking.split_images(data, result["num_images"], data.image_size)
  thumbs = {iid: images_lib.encode_image(pix[row_of[iid]], "png") for iid in sorted(shown)}
  summary = (f"{args.checkpoint} (step {ranker.model.step}), split {args.split}: "
             f"{result['num_sentences']} sentences x {result['num_images']} images; "
             f"score: {result['score']}")
  return rank_page.write_page(args.html, queries, images, result, thumbs, grid_of(ranker),
                              title="captionjax: image-sentence ranking", summary=summary)


# ---------------------------------------------------------------- queries


def _tokens(ranker, sentences):
  """Words [M, T] of sentences (UNK for words not in the vocabulary, noted on stderr)."""
  from captionjax import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  vocab, t = ranker.model.vocab, ranker.model.max_length
  out = np.zeros((len(sentences), t), np.int32)
  unknown = set()
  for i, s in enumerate(sentences):
    words = vocab_lib.tokenize(s)
    if not words:
      raise UsageError(f"sentence {i + 1} has no words: {s!r}")
    if len(words) > t:
      _say(f"note: sentence {i + 1} cut to its first {t} words")
    unknown |= {w for w in words if w not in vocab.word_to_ix}
    ids = vocab.encode(words, t)
    out[i, :len(ids)] = ids
  if unknown:
    _say(f"note: not in the vocabulary (read as UNK): {', '.join(sorted(unknown))}")
  return out


def _load_images(ranker, paths):
  """(model inputs [N, S, S, 3], the files that loaded); failures named on stderr."""
  from captionjax import inference  # pylint: disable=g-import-not-at-top
  load = inference.image_loader(ranker.model)
  pixels, ok = [], []
  for p in paths:
    try:
      pixels.append(load(p)[0])
      ok.append(p)
    except Exception as e:  # pylint: disable=broad-except
      _say(f"skipped {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
  if not ok:
    raise UsageError("no image could be read")
  return np.stack(pixels), ok


def _word_list(ranker, tokens_row, grounding, region, grid):
  vocab = ranker.model.vocab
  out = []
  for t, tok in enumerate(tokens_row):
    if tok <= 0:
      break
    w = {"word": vocab.words[tok - 1]}
    if grounding is not None:
      w.update(score=round(float(grounding[t]), 4), region=int(region[t]),
               where=region_name(int(region[t]), grid))
    out.append(w)
  return out


def run_query(args, ranker) -> int:
  from captionjax import caption  # pylint: disable=g-import-not-at-top
  try:
    paths, _ = caption.list_images(args.images)
  except caption.UsageError as e:
    raise UsageError(str(e)) from None
  if not paths:
    raise UsageError(f"--images={args.images}: no image files found")
  tokens = _tokens(ranker, [args.query])
  pixels, paths = _load_images(ranker, paths)
  feats = ranker.features(pixels, args.batch_size)
  scores = ranker.score(feats, tokens)[0]  # -> [N]
  best = np.argsort(-scores, kind="stable")[:args.top]
  g = ranker.groundings(feats[best], np.repeat(tokens, len(best), axis=0))
  grid = grid_of(ranker)
  results = []
  print(f"query: {args.query}")
  for r, j in enumerate(best):
    words = _word_list(ranker, tokens[0], None if g is None else g[0][r],
                       None if g is None else g[1][r], grid)
    results.append({"rank": r + 1, "file": paths[j], "score": round(float(scores[j]), 4),
                    "words": words})
    print(f"{r + 1:3d}. {scores[j]:9.3f}  {paths[j]}")
    for w in words:
      if "score" in w:
        print(f"       {w['word']:<12} {w['score']:7.3f}  {w['where']}")
  if args.output:
    _write(args.output, {"query": args.query, "images": len(paths), "score": ranker.description,
                         "results": results})
  return EXIT_OK


def run_sentences(args, ranker) -> int:
  try:
    with open(args.sentences, encoding="utf-8") as f:
      sentences = [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise UsageError(f"--sentences={args.sentences}: {e.strerror}") from None
  except UnicodeDecodeError:
    raise UsageError(f"--sentences={args.sentences}: not UTF-8 text") from None
  if not sentences:
    raise UsageError(f"--sentences={args.sentences}: no sentences in it")
  if not os.path.isfile(args.image):
    raise UsageError(f"--image={args.image}: no such file")
  tokens = _tokens(ranker, sentences)
  pixels, _ = _load_images(ranker, [args.image])
  feats = ranker.features(pixels, 1)
  scores = ranker.score(feats, tokens)[:, 0]  # -> [M]
  best = np.argsort(-scores, kind="stable")[:args.top]
  g = ranker.groundings(np.repeat(feats, len(best), axis=0), tokens[best])
  grid = grid_of(ranker)
  results = []
  print(f"image: {args.image}")
  for r, i in enumerate(best):
    words = _word_list(ranker, tokens[i], None if g is None else g[0][r],
                       None if g is None else g[1][r], grid)
    results.append({"rank": r + 1, "sentence": sentences[i], "score": round(float(scores[i]), 4),
                    "words": words})
    print(f"{r + 1:3d}. {scores[i]:9.3f}  {sentences[i]}")
  if args.output:
    _write(args.output, {"image": args.image, "sentences": len(sentences),
                         "score": ranker.description, "results": results})
  return EXIT_OK


def _write(path: str, obj) -> None:
  try:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(obj, f, ensure_ascii=False, indent=1)
  except OSError as e:
    raise UsageError(f"--output={path}: {e.strerror}") from None
