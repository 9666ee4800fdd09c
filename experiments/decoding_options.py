"""Experiment: the decoding options on a trained workdir's test split.

    python experiments/decoding_options.py --workdir=runs/default \\
        [--ensemble_step=1000] [--out=decoding_options.json]

Captions every image of the split with each option set (one jitted program
each, `inference.BatchCaptioner` over the decoded split in memory, as the
trainer's final test) and scores them as `scores.json` does (CIDEr-D, BLEU-4,
ROUGE-L, hallucination-free on shapes, distinct captions). The "beam 2"
row is the default decoding, so its scores are the workdir's scores.json.
The ensemble pairs the latest checkpoint with the one at --ensemble_step.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from captionjax import decode, evaluation, inference, input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

D = decode.DecodeOptions
OPTION_SETS = {
    "beam 2 (default)": D(beam_size=2),
    "beam 2, min_length 0, no bad endings (before)": D(beam_size=2, min_length=0, bad_endings=()),
    "beam 2, no bad endings": D(beam_size=2, bad_endings=()),
    "beam 2 + trigram blocking": D(beam_size=2, block_trigrams=True),
    "diverse beam 2 (G = 2, lambda 0.5)": D(beam_size=2, num_groups=2, diversity_lambda=0.5),
    "greedy": D(beam_size=1),
    "top-p 0.9 sampling": D(sample=True, top_p=0.9),
    "2-model ensemble, beam 2": D(beam_size=2),
}


def caption(captioner, data, batch_size):
  """[{image_id, caption}] of every image of the split (batches padded by the captioner)."""
  out = []
  for start in range(0, len(data), batch_size):
    images = data.images[start:start + batch_size]
    for i, caps in enumerate(captioner(np.stack([captioner.model.preprocess(x) for x in images]))):
      out.append({"image_id": int(data.image_id[start + i]), "caption": caps[0][0] if caps else ""})
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished `captionjax train` workdir")
  p.add_argument("--ensemble_step", type=int, default=None,
                 help="the second ensemble member: this step of the same workdir")
  p.add_argument("--split", default="test")
  p.add_argument("--batch_size", type=int, default=100)
  p.add_argument("--only", default="", help="comma-separated option-set names (prefixes)")
  p.add_argument("--out", default="", help="also write the rows as JSON here")
  args = p.parse_args()
  model = inference.load_workdir(args.workdir)
  data_dir = input_pipeline.data_dir_for(model.config)
  data = input_pipeline.load_split(data_dir, args.split, decode=True)
  refs = evaluation.references(data_dir, args.split)
  rows = {}
  for name, options in OPTION_SETS.items():
    if args.only and not any(name.startswith(x) for x in args.only.split(",")):
      continue
    models = [model]
    if name.startswith("2-model"):
      if args.ensemble_step is None:
        continue
      models.append(inference.load_workdir(args.workdir, args.ensemble_step))
    captioner = inference.BatchCaptioner(models, batch_size=args.batch_size, options=options)
    t0 = time.time()
    caps = caption(captioner, data, args.batch_size)
    s = evaluation.score_captions(caps, refs, data)
    rows[name] = {"CIDEr": round(s["CIDEr"], 3), "Bleu_4": round(s["Bleu_4"], 3),
                  "distinct_captions": s["distinct_captions"],
                  "hallucination_free": s.get("hallucination_free"),
                  "empty": sum(not c["caption"] for c in caps),
                  "steps": [m.step for m in models], "seconds": round(time.time() - t0, 1)}
    print(json.dumps({name: rows[name]}), flush=True)
  print("\n| decoding | CIDEr | BLEU-4 | distinct captions |\n|---|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {r['CIDEr']:.3f} | {r['Bleu_4']:.3f} | {r['distinct_captions']} |")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"workdir": args.workdir, "split": args.split, "images": len(data),
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
