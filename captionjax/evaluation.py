"""Evaluation: run a trained captioner over a split and score what it says.

  compute_features  the frozen CNN's features of every image of some splits
  caption_split     greedy or beam captions of every image of a split
  references        a split's reference captions, by image id
  score_captions    the coco-caption metrics of captions (+ hallucination_free and
                    names_exactly on shapes)
  human_ceiling     one reference scored against the others: what a person gets
  Validator         the validation loss, greedy captions and scores of a train state
  final_test        the test split(s)' captions (decode.DecodeOptions of the config) and
                    scores, written to files
  validator_for     Validator, or ranking.RankValidator for the alignment model
(The alignment model's final test is ranking.final_test: final_test hands over.)

Every batch is padded to one shape (input_pipeline.eval_batches: `_mask` 0 on
padding), so one compiled program serves a whole split and no image is dropped.

Dimensions: N images in a split, D CNN feature size, K beams.
"""

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from captionjax import decode
from captionjax import files
from captionjax import input_pipeline
from captionjax import parallel
from captionjax import records
from captionjax import steps
from captionjax.models import build
from captionjax.models.build import cnn_variables, images_to_input


def compute_features(cnn, params, batch_stats, splits: dict, batch_size: int,
                     mesh_put, crop_size: int = 0) -> dict:
  """The frozen CNN's features of every image of each split: name -> [N, D] float32.

  One jitted program serves every split (eval batches are padded to one shape);
  images are center-cropped to `crop_size` (0: as stored), as in evaluation.
  """
  fn = jax.jit(lambda p, bs, x: cnn.apply(cnn_variables(p, bs), images_to_input(x), train=False))
  features = {}
  for name, data in splits.items():
    out = []
    for batch in input_pipeline.eval_batches(data, batch_size, 1, crop_size):
      f = fn(params, batch_stats, mesh_put(batch["image"]))
      out.append(parallel.to_host(f)[batch["_mask"] > 0])
    features[name] = np.concatenate(out)
  return features


def caption_split(generate_fn, params, batch_stats, data, vocab, batch_size, mesh_put,
                  features=None, limit=None, crop_size: int = 0, rng=None, bad_endings=None):
  """Captions every image of a split: list of {image_id, file_name, caption, logprob}.

  Images are center-cropped to `crop_size` (0: as stored), as the model saw them.
  generate_fn: steps.make_generate's, jitted; the first of its captions of
  each image is kept. `rng` (sampling: folded with the batch number) and
  `bad_endings` (the bool [V+1] mask) go to it when given.
  """
  out = []
  kw = {} if bad_endings is None else {"bad_endings": bad_endings}
  batches = input_pipeline.eval_batches(data, batch_size, 1, crop_size, limit=limit)
  for n, batch in enumerate(batches):
    x = features[batch["row"]] if features is not None else batch["image"]
    if rng is not None:
      kw["rng"] = jax.random.fold_in(rng, n)
    tokens, scores = generate_fn(params, batch_stats, mesh_put(x), **kw)
    tokens, scores = parallel.to_host(tokens), parallel.to_host(scores)  # host sync
    for i in np.nonzero(batch["_mask"])[0]:
      row = int(batch["row"][i])
      out.append({"image_id": int(data.image_id[row]), "file_name": data.file_name[row],
                  "caption": vocab.decode(tokens[i, 0]), "logprob": float(scores[i, 0])})
  return out


def references(data_dir: str, split: str) -> dict:
  """image_id -> list of raw reference captions."""
  with open(records.annotations_path(data_dir, split), encoding="utf-8") as f:
    anns = json.load(f)
  refs = {}
  for a in anns["annotations"]:
    refs.setdefault(a["image_id"], []).append(a["caption"])
  return refs


def score_captions(captions: list, refs: dict, data, metrics=("bleu", "rouge", "cider"),
                   meteor: bool = False) -> dict:
  """coco-caption scores of `captions`, plus hallucination_free when objects are known."""
  from captionjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  gts = {c["image_id"]: refs[c["image_id"]] for c in captions}
  res = {c["image_id"]: c["caption"] for c in captions}
  names = tuple(metrics) + (("meteor",) if meteor else ())
  scores = dict(metrics_lib.score(gts, res, metrics=names))
  objects = {int(i): o for i, o in zip(data.image_id, data.objects) if o is not None}
  if objects and all(c["image_id"] in objects for c in captions):
    from captionjax import shapes  # pylint: disable=g-import-not-at-top
    ok = [shapes.hallucination_free(c["caption"], objects[c["image_id"]]) for c in captions]
    scores["hallucination_free"] = float(np.mean(ok))
    exact = [shapes.names_exactly(c["caption"], objects[c["image_id"]]) for c in captions]
    scores["names_exactly"] = float(np.mean(exact))
  scores["distinct_captions"] = len({c["caption"] for c in captions})
  return scores


def human_ceiling(refs: dict, image_ids) -> dict:
  """CIDEr-D and BLEU-4 of each image's first reference against its other references."""
  from captionjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  ids = [i for i in image_ids if len(refs[i]) > 1]
  gts = {i: refs[i][1:] for i in ids}
  res = {i: refs[i][0] for i in ids}
  s = metrics_lib.score(gts, res, metrics=("bleu", "cider"))
  return {"CIDEr": s["CIDEr"], "Bleu_4": s["Bleu_4"]}


def mean_loss(eval_step, state, batches, keys, features, mesh_put) -> float:
  """Mean per-token loss of `eval_step` (-> "loss_sum", "count") over `batches`:
  each batch's `keys`, and "features" (rows of `features`) or "image"."""
  sums = {"loss_sum": 0.0, "count": 0.0}
  for b in batches:
    x = {k: b[k] for k in keys}
    if features is not None:
      x["features"] = features[b["row"]]
    else:
      x["image"] = b["image"]
    m = eval_step(state["params"], state["batch_stats"], {k: mesh_put(v) for k, v in x.items()})
    sums = {k: sums[k] + float(parallel.to_host(m[k])) for k in sums}
  return sums["loss_sum"] / max(sums["count"], 1)


class Validator:
  """The validation split's loss and greedy captions' scores for a train state.

  `features`: the split's cached CNN features [N, D] (None: images through
  the CNN). `run(state)` -> (record for the log, the captions).
  """

  def __init__(self, cnn, lm, mode, data, refs, vocab, config, max_length, mesh_put,
               features=None):
    self.data, self.refs, self.vocab, self.config = data, refs, vocab, config
    self.mesh_put, self.features = mesh_put, features
    self.eval_step = jax.jit(steps.make_eval_step(cnn, lm, mode))
    self.greedy = jax.jit(steps.make_generate(
        cnn, lm, mode, decode.DecodeOptions(beam_size=1, bad_endings=()), max_length + 1))

  def loss(self, state) -> float:
    """Mean per-token cross-entropy of the split's reference captions."""
    batches = input_pipeline.eval_batches(self.data, self.config.eval_batch_size,
                                          self.config.seq_per_img, self.config.crop_size)
    return mean_loss(self.eval_step, state, batches, ("captions", "mask", "_mask"),
                     self.features, self.mesh_put)

  def __call__(self, state, step: int, logger):
    """Runs on `state`; logs the record and sample captions at `step`; returns the record."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    rec, caps = self.run(state)
    if rec:
      logger.log(step, rec, echo=lambda s: tqdm.write(s, file=sys.stderr))
      logger.text(step, "val_samples", "\n\n".join(
          f"{c['file_name']}: {c['caption']}" for c in caps[:8]))
    return rec

  def run(self, state):
    """(record, captions) of `state` on the split; (None, []) without a split."""
    if self.data is None:
      return None, []
    val_loss = self.loss(state)
    caps = caption_split(self.greedy, state["params"], state["batch_stats"], self.data,
                         self.vocab, self.config.eval_batch_size, self.mesh_put, self.features,
                         limit=self.config.eval_num_images, crop_size=self.config.crop_size)
    scores = score_captions(caps, self.refs, self.data)
    rec = {"phase": "val", "val_loss": val_loss, "val_perplexity": float(np.exp(val_loss)),
           **{f"val_{k}": v for k, v in scores.items()}}
    return rec, caps

  @staticmethod
  def selection(rec: dict):
    """(score, name) by which the best checkpoint is kept: CIDEr, else -loss."""
    if "val_CIDEr" in rec:
      return rec["val_CIDEr"], "val_CIDEr"
    return -rec["val_loss"], "-val_loss"


def validator_for(cnn, lm, mode, data, refs, vocab, config, max_length, mesh_put,
                  features=None):
  """The validator of config.model.kind: Validator or ranking.RankValidator."""
  if build.model_kind(config) == "ranking":
    from captionjax import ranking  # pylint: disable=g-import-not-at-top
    return ranking.RankValidator(cnn, lm, mode, data, config, mesh_put, features)
  return Validator(cnn, lm, mode, data, refs, vocab, config, max_length, mesh_put, features)


def final_test(cnn, lm, params, batch_stats, config, data_dir, info, vocab, mesh_put,
               workdir, t_start, say=print) -> dict:
  """Captions the test split(s) as the config's decoding fields say (beam
  search by default); writes captions.json and scores.json.

  The splits are `config.test_split` and those of `config.extra_test_splits`
  the data set has. Returns what scores.json holds: the test split's scores
  and {"splits": {split: scores}, "beam_size", "decoding", "train_seconds"}. The
  alignment model is ranked instead (ranking.final_test: ranking.json).
  """
  if build.model_kind(config) == "ranking":
    from captionjax import ranking  # pylint: disable=g-import-not-at-top
    params, batch_stats = parallel.tree_to_host((params, batch_stats))
    return ranking.final_test(cnn, lm, params, batch_stats, config, data_dir, info, vocab,
                              mesh_put, workdir, t_start, say)
  options = decode.DecodeOptions.from_config(config)
  gen = jax.jit(steps.make_generate(cnn, lm, "frozen", options, info["max_length"] + 1))
  kw = {"bad_endings": decode.bad_ending_mask(options.bad_endings, vocab.word_to_ix, len(vocab)),
        "rng": jax.random.PRNGKey(config.seed) if options.sample else None}
  results = {}
  splits = [config.test_split] + [s for s in config.extra_test_splits if s in info["splits"]]
  for split in splits:
    if split not in info["splits"]:
      say(f"note: no split {split!r} to test on")
      continue
    data = input_pipeline.load_config_split(config, data_dir, split)
    t0 = time.time()
    caps = caption_split(gen, params, batch_stats, data, vocab, config.eval_batch_size, mesh_put,
                         crop_size=config.crop_size, **kw)
    dt = time.time() - t0
    refs = references(data_dir, split)
    scores = score_captions(caps, refs, data, meteor=True)
    scores["images_per_s"] = round(len(caps) / dt, 1)
    if split == config.test_split and parallel.is_writer():
      files.write_json(os.path.join(workdir, "captions.json"), caps, indent=0)
      scores["human_ceiling"] = human_ceiling(refs, [c["image_id"] for c in caps])
    results[split] = scores
  results["beam_size"] = config.beam_size
  results["decoding"] = dataclasses.asdict(options)
  results["train_seconds"] = round(time.time() - t_start, 1)
  out = {**results.get(config.test_split, {}), "splits": results}
  if parallel.is_writer():
    files.write_json(os.path.join(workdir, "scores.json"), out, indent=1)
  return out
