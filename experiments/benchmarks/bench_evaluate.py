"""Benchmark: `captionjax evaluate` against pycocoevalcap's scorers on Flickr8k captions.

  python experiments/benchmarks/bench_evaluate.py \
      --token_file=/path/to/Flickr8k.token.txt [--images=0] [--repeats=3]

From Flickr8k's caption file (`IMAGE.jpg#N<TAB>caption`, 5 human captions
per image) it writes, in `--scratch_dir`, COCO-format annotations (captions
1..4 of each image as references) and results (caption 0 as the candidate),
then scores them three ways:

  1. `captionjax evaluate` as a new user runs it (a subprocess: interpreter
     start, imports and JSON reading included);
  2. `captionjax.metrics` in process, metric by metric;
  3. pycocoevalcap's `PTBTokenizer`, `Bleu(4)`, `Meteor`, `Rouge` and `Cider`
     imported and called directly (coco-caption's `COCOEvalCap.evaluate()` is
     not used: it tries to download SPICE's models).

It prints every metric from each (the check: equal to 1e-6, METEOR 1e-4;
exit status 1 if not) and the median time of `--repeats` runs after one
warm-up run. Java is needed for METEOR and for pycocoevalcap's tokenizer.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from captionjax import metrics
from captionjax.metrics import meteor as meteor_lib

# "IMAGE.jpg#N<TAB>caption" (a few lines of the distributed file use a space).
_LINE = re.compile(r"^(\S+)#(\d+)\s+(.*?)\s*$")
TOL = 1e-6
TOL_METEOR = 1e-4
KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def read_token_file(path: str) -> dict:
  """{image file: {caption number: caption}} from Flickr8k.token.txt."""
  out: dict = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      m = _LINE.match(line)
      if not m:
        raise ValueError(f"{path}:{lineno}: expected 'IMAGE#N<TAB>caption', got {line[:60]!r}")
      out.setdefault(m.group(1), {})[int(m.group(2))] = m.group(3)
  return out


def write_coco_files(captions: dict, out_dir: str, num_images: int) -> tuple[str, str, int]:
  """Writes annotations.json (captions 1..) and results.json (caption 0)."""
  images, anns, res = [], [], []
  for name in sorted(captions):
    caps = captions[name]
    refs = [caps[i] for i in sorted(caps) if i != 0]
    if 0 not in caps or not refs:
      continue  # an image without a candidate or without references
    image_id = len(images)
    images.append({"id": image_id, "file_name": name})
    for c in refs:
      anns.append({"image_id": image_id, "id": len(anns), "caption": c})
    res.append({"image_id": image_id, "caption": caps[0]})
    if num_images and len(images) == num_images:
      break
  os.makedirs(out_dir, exist_ok=True)
  ann_path = os.path.join(out_dir, "annotations.json")
  res_path = os.path.join(out_dir, "results.json")
  with open(ann_path, "w", encoding="utf-8") as f:
    json.dump({"images": images, "annotations": anns}, f, ensure_ascii=False)
  with open(res_path, "w", encoding="utf-8") as f:
    json.dump(res, f, ensure_ascii=False)
  return ann_path, res_path, len(images)


def load_pair(ann_path: str, res_path: str) -> tuple[dict, dict]:
  """{image_id: [reference, ...]} and {image_id: candidate} from the files."""
  with open(ann_path, encoding="utf-8") as f:
    anns = json.load(f)["annotations"]
  with open(res_path, encoding="utf-8") as f:
    res = json.load(f)
  gts: dict = {}
  for a in anns:
    gts.setdefault(a["image_id"], []).append(a["caption"])
  return gts, {r["image_id"]: r["caption"] for r in res}


def run_cli(ann_path: str, res_path: str) -> tuple[dict, dict]:
  """`captionjax evaluate` in a subprocess; (scores, {"total": s})."""
  cmd = [sys.executable, "-m", "captionjax.cli", "evaluate",
         f"--annotations={ann_path}", f"--results={res_path}"]
  t = time.perf_counter()
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  total = time.perf_counter() - t
  if out.returncode != 0:
    raise RuntimeError(f"captionjax evaluate failed ({out.returncode}): {out.stderr[-500:]}")
  return json.loads(out.stdout), {"total": total}


def run_ours(gts: dict, res: dict) -> tuple[dict, dict]:
  """captionjax.metrics in process, timed per stage."""
  times, scores = {}, {}
  t = time.perf_counter()
  keys = list(res)
  refs = metrics.tokenize({k: gts[k] for k in keys})
  hyps = dict(zip(keys, ([h] for h in metrics.tokenize_captions([res[k] for k in keys]))))
  times["tokenize"] = time.perf_counter() - t
  t = time.perf_counter()
  bleu, _ = metrics.compute_bleu(refs, hyps)
  scores.update(zip(KEYS[:4], map(float, bleu)))
  times["bleu"] = time.perf_counter() - t
  t = time.perf_counter()
  scores["METEOR"], _ = metrics.compute_meteor(refs, hyps)
  times["meteor"] = time.perf_counter() - t
  t = time.perf_counter()
  scores["ROUGE_L"], _ = metrics.compute_rouge(refs, hyps)
  times["rouge"] = time.perf_counter() - t
  t = time.perf_counter()
  scores["CIDEr"], _ = metrics.compute_cider(refs, hyps)
  times["cider"] = time.perf_counter() - t
  times["total"] = sum(times.values())
  return scores, times


def run_reference(gts: dict, res: dict) -> tuple[dict, dict]:
  """pycocoevalcap's scorers called directly, timed per stage."""
  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  times, scores = {}, {}
  t = time.perf_counter()
  keys = list(res)
  tok = PTBTokenizer()
  refs = tok.tokenize({k: [{"caption": c} for c in gts[k]] for k in keys})
  hyps = tok.tokenize({k: [{"caption": res[k]}] for k in keys})
  times["tokenize"] = time.perf_counter() - t
  t = time.perf_counter()
  bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
  scores.update(zip(KEYS[:4], map(float, bleu)))
  times["bleu"] = time.perf_counter() - t
  t = time.perf_counter()
  meteor = Meteor()  # starts the jar, as coco-caption does per evaluation
  scores["METEOR"], _ = meteor.compute_score(refs, hyps)
  del meteor  # its __del__ stops the jar
  times["meteor"] = time.perf_counter() - t
  t = time.perf_counter()
  scores["ROUGE_L"], _ = Rouge().compute_score(refs, hyps)
  times["rouge"] = time.perf_counter() - t
  t = time.perf_counter()
  scores["CIDEr"], _ = Cider().compute_score(refs, hyps)
  times["cider"] = time.perf_counter() - t
  times["total"] = sum(times.values())
  return {k: float(v) for k, v in scores.items()}, times


def timed(fn, repeats: int) -> tuple[dict, dict]:
  """Runs fn once to warm up, then `repeats` times; median time of each stage."""
  fn()
  runs = [fn() for _ in range(repeats)]
  scores = runs[-1][0]
  times = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
  return scores, times


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--token_file", required=True, help="Flickr8k.token.txt")
  parser.add_argument("--images", type=int, default=0, help="images to score (0 = all)")
  parser.add_argument("--scratch_dir", default="",
                      help="where annotations.json and results.json go (default: a temp dir)")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
  args = parser.parse_args()
  why = meteor_lib.missing_requirement()
  if why:
    print(f"error: {why}; this comparison needs Java", file=sys.stderr)
    return 2

  scratch = args.scratch_dir or tempfile.mkdtemp(prefix="bench_evaluate-")
  ann_path, res_path, n = write_coco_files(read_token_file(args.token_file), scratch, args.images)
  gts, res = load_pair(ann_path, res_path)
  n_refs = sum(len(gts[k]) for k in res)
  print(f"{n} images, {n_refs} references (captions 1-4), candidate = caption 0; files in {scratch}")
  print(f"median of {args.repeats} runs after a warm-up; os.cpu_count()={os.cpu_count()}")

  cli_scores, cli_t = timed(lambda: run_cli(ann_path, res_path), args.repeats)
  our_scores, our_t = timed(lambda: run_ours(gts, res), args.repeats)
  ref_scores, ref_t = timed(lambda: run_reference(gts, res), args.repeats)

  ok = True
  print(f"\n{'metric':8s} {'captionjax evaluate':>20s} {'pycocoevalcap':>16s} {'|difference|':>13s}")
  for key in KEYS:
    diff = abs(cli_scores[key] - ref_scores[key])
    diff_in = abs(our_scores[key] - ref_scores[key])
    tol = TOL_METEOR if key == "METEOR" else TOL
    good = max(diff, diff_in) <= tol
    ok &= good
    print(f"{key:8s} {cli_scores[key]:20.12f} {ref_scores[key]:16.12f} {diff:13.2e} "
          f"{'ok' if good else 'MISMATCH'} (tolerance {tol:g})")

  print(f"\n{'stage':10s} {'captionjax':>11s} {'pycocoevalcap':>14s} {'ratio':>7s}")
  for stage in ("tokenize", "bleu", "meteor", "rouge", "cider", "total"):
    print(f"{stage:10s} {our_t[stage]:10.3f}s {ref_t[stage]:13.3f}s "
          f"{ref_t[stage] / our_t[stage]:6.1f}x")
  no_meteor = {k: v["total"] - v["meteor"] for k, v in (("ours", our_t), ("ref", ref_t))}
  print(f"{'no METEOR':10s} {no_meteor['ours']:10.3f}s {no_meteor['ref']:13.3f}s "
        f"{no_meteor['ref'] / no_meteor['ours']:6.1f}x   (tokenize + BLEU + ROUGE-L + CIDEr)")
  print(f"\n`captionjax evaluate` end to end (new process, imports and files included): "
        f"{cli_t['total']:.3f}s vs pycocoevalcap scorers {ref_t['total']:.3f}s: "
        f"{ref_t['total'] / cli_t['total']:.1f}x")
  print("all metrics equal within tolerance" if ok else "MISMATCH: see above")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
