"""A dry run of this experiment's commands on a CPU, a few steps on mock data.

  python experiments/coco_vgg16/dry_run.py --workdir=/tmp/coco_vgg16_dry

Runs the README's commands through the `captionjax` CLI, with two stand-ins
for what cannot be downloaded here:
  * COCO: `tfds.testing.mock_data` serves generated coco_captions examples
    (random-sized images, captions from a few templates) to
    `captionjax prepro --tfds=coco_captions`, through the builder's own
    feature encoding (the default random mock cannot encode coco_captions'
    captions sequence);
  * the ImageNet VGG16 file: Keras's VGG16 with random weights, written by
    Keras's legacy HDF5 saver (the layout of
    vgg16_weights_tf_dim_ordering_tf_kernels.h5), then `import-weights`.
Training then runs the experiment's config with a handful of steps and tiny
batches: frozen CNN for `--frozen_steps`, fine-tuning after, evaluation,
checkpoints and the beam-search test captions, then `--scst_steps` of
self-critical training. It checks that the CNN starts from the imported
weights, stays frozen, then moves, and stays put in SCST while the LSTM moves.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # pylint: disable=g-import-not-at-top

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("a man riding a wave on top of a surfboard", "a plate of food with broccoli and rice",
         "two dogs playing with a frisbee in the grass", "a red bus parked on the side of a street",
         "a cat sitting on a wooden bench", "a group of people standing in a kitchen")
SPLIT_SIZES = {"train": 6, "restval": 2, "val": 4, "test": 4}


def mock_examples(split: str) -> list[dict]:
  rng = np.random.default_rng(list(SPLIT_SIZES).index(split))
  out = []
  for i in range(SPLIT_SIZES[split]):
    h, w = rng.integers(180, 400, 2)
    image_id = 1000 * (list(SPLIT_SIZES).index(split) + 1) + i
    caps = [WORDS[(i + j) % len(WORDS)] for j in range(5)]
    out.append({
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "image/filename": f"COCO_{split}2014_{image_id:012d}.jpg", "image/id": image_id,
        "captions": {"id": np.arange(5, dtype=np.int64), "text": caps},
        "objects": {"area": np.array([30], np.int64), "bbox": np.array([[.1, .2, .5, .6]], np.float32),
                    "id": np.array([i], np.int64), "is_crowd": np.array([False]),
                    "label": np.array([i % 80], np.int64)}})
  return out


def mock_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
  """coco_captions examples, serialized and parsed by the builder's features."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  del read_config, shuffle_files
  feats = self.info.features
  data = [feats.serialize_example(ex) for ex in mock_examples(str(split))]
  return tf.data.Dataset.from_tensor_slices(data).map(
      lambda x: feats.deserialize_example(x, decoders=decoders))


def random_keras_vgg16_h5(path: str) -> None:
  import h5py  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  model = keras.applications.VGG16(weights=None)
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--frozen_steps", type=int, default=2)
  parser.add_argument("--finetune_steps", type=int, default=2)
  parser.add_argument("--scst_steps", type=int, default=2)
  args = parser.parse_args()
  sys.path.insert(0, os.path.join(HERE, "..", ".."))
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from captionjax import checkpoints, cli  # pylint: disable=g-import-not-at-top
  from captionjax import weights  # pylint: disable=g-import-not-at-top

  w = args.workdir
  os.makedirs(w, exist_ok=True)
  t0 = time.time()
  h5 = os.path.join(w, "vgg16_random_keras_legacy.h5")
  if not os.path.exists(h5):
    random_keras_vgg16_h5(h5)
  wdir, data, run = (os.path.join(w, n) for n in ("weights", "coco_224", "run"))
  steps = args.frozen_steps + args.finetune_steps
  commands = [
      ["import-weights", f"--keras_h5={h5}", f"--output={wdir}"],
      ["prepro", "--tfds=coco_captions", f"--tfds_data_dir={w}/tfds", "--image_size=224",
       f"--output_dir={data}", "--max_length=16", "--word_count_threshold=0", "--num_workers=1"],
      ["train", f"--config={HERE}/config.py", f"--workdir={run}", "--no_progress",
       f"--config.dataset={data}", f"--config.model.cnn_weights={wdir}",
       f"--config.num_train_steps={steps}", f"--config.finetune_cnn_after={args.frozen_steps}",
       f"--config.scst_steps={args.scst_steps}", "--config.scst_samples=2",
       "--config.batch_size=2", "--config.eval_every_steps=1000", "--config.eval_num_images=4",
       "--config.eval_batch_size=4", "--config.log_every_steps=1",
       f"--config.checkpoint_every_steps={args.frozen_steps}"],
  ]
  for cmd in commands:
    print("+ captionjax " + " ".join(cmd), flush=True)
    t = time.time()
    if cmd[0] == "prepro":
      with tfds.testing.mock_data(as_dataset_fn=mock_as_dataset):
        rc = cli.main(cmd)
    else:
      rc = cli.main(cmd)
    print(f"  -> exit status {rc} in {time.time() - t:.1f}s", flush=True)
    if rc:
      return rc

  # The CNN started from the imported weights, stayed frozen, then moved; in SCST
  # (scst_finetune_cnn=False) it stays as fine-tuning left it and the LSTM moves.
  ckpt = checkpoints.Checkpointer(run, 10)
  last = steps + args.scst_steps
  saved = {s: jax.device_get(ckpt.restore(s, None)["params"]) for s in (args.frozen_steps, steps, last)}
  phase = ckpt.restore_meta(last)["phase"]
  ckpt.close()
  cnn = {s: p["cnn"] for s, p in saved.items()}
  imported, _ = weights.load(wdir)
  frozen_same = all(np.array_equal(cnn[args.frozen_steps][k]["kernel"], imported[k]["kernel"])
                    for k in cnn[args.frozen_steps])
  moved = any(not np.array_equal(cnn[steps][k]["kernel"], imported[k]["kernel"]) for k in cnn[steps])
  leaves = lambda t: jax.tree_util.tree_leaves(t)
  scst_cnn_same = all(np.array_equal(a, b) for a, b in zip(leaves(cnn[steps]), leaves(cnn[last])))
  scst_lm_moved = any(not np.array_equal(a, b) for a, b in zip(leaves(saved[steps]["lm"]),
                                                                 leaves(saved[last]["lm"])))
  with open(os.path.join(run, "train_log.jsonl"), encoding="utf-8") as f:
    log = [json.loads(line) for line in f]
  with open(os.path.join(run, "scores.json"), encoding="utf-8") as f:
    scores = json.load(f)
  summary = {"cnn_equals_imported_after_frozen_steps": frozen_same,
             "cnn_moved_after_finetuning": moved,
             "scst_phase": phase, "scst_cnn_unchanged": scst_cnn_same,
             "scst_lm_moved": scst_lm_moved,
             "scst_rewards": [round(r["reward"], 3) for r in log if "reward" in r],
             "logged_steps": sorted({r["step"] for r in log if "loss" in r}),
             "losses": [round(r["loss"], 3) for r in log if "loss" in r],
             "compile_seconds": [r["compile_seconds"] for r in log if "compile_seconds" in r],
             "test_scores": {k: scores.get(k) for k in ("Bleu_4", "CIDEr", "METEOR")},
             "seconds": round(time.time() - t0, 1)}
  print(json.dumps(summary, indent=1))
  ok = frozen_same and moved and phase == "scst" and scst_cnn_same and scst_lm_moved
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
