"""How far apart runs on 1 and 4 devices drift, against reordering one device's batch.

    python experiments/parallel_drift.py [--steps=200] [--config=default]

Runs the default recipe's first phase (CNN object pretraining, the most
chaotic: ReLU, max-pooling, BatchNorm, Adam) on the same batches three ways,
on 4 fake CPU devices set up by this script:
  one       1 device
  reversed  1 device, each batch's rows in reverse order (the same sums, in
            another float32 order; mathematically the same step)
  four      4 devices, the batch split over them (parallel.Placement)
and prints each run's loss and relative difference from `one` at some steps.
If `four` drifts no more than `reversed`, the drift is float32 rounding
amplified by training, not a parallelism error.
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from captionjax import configs  # pylint: disable=wrong-import-position
from captionjax import input_pipeline  # pylint: disable=wrong-import-position
from captionjax import optim  # pylint: disable=wrong-import-position
from captionjax import parallel  # pylint: disable=wrong-import-position
from captionjax import records  # pylint: disable=wrong-import-position
from captionjax import shapes  # pylint: disable=wrong-import-position
from captionjax import steps  # pylint: disable=wrong-import-position
from captionjax import vocab as vocab_lib  # pylint: disable=wrong-import-position
from captionjax.models import build  # pylint: disable=wrong-import-position


def run(config, batches, place, reverse: bool) -> list:
  """Pretraining losses of `batches` from the config's initial state, placed by `place`."""
  data_dir = input_pipeline.data_dir_for(config)
  info = records.load_info(data_dir)
  cnn, lm, _ = build.make_models(config, len(vocab_lib.Vocabulary.load(data_dir)))
  init_rng, heads_rng, lm_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed), 4)
  params, batch_stats, feat_dim = build.init_params(
      config, cnn, lm, info["image_size"], info["max_length"], init_rng, lm_rng)
  states = optim.TrainStates(config, params, batch_stats, feat_dim, heads_rng)
  state = place.state(states.pretrain())
  step = jax.jit(steps.make_pretrain_step(cnn, states.heads, states.tx_pre), donate_argnums=(0,))
  losses = []
  for batch in batches:
    batch = {k: place.batch(v[::-1] if reverse else v) for k, v in batch.items()}
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics["loss_sum"] / metrics["count"]))
  return losses


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--config", default="default")
  args = p.parse_args(argv)
  config = configs.load_config(args.config, [])
  data_dir = input_pipeline.data_dir_for(config)
  train = input_pipeline.load_config_split(config, data_dir, "train")
  targets = shapes.object_targets(train.objects, config.model.cnn_kwargs.grid)
  it = input_pipeline.TrainIterator(train, config.batch_size, seq_per_img=config.seq_per_img,
                                    seed=config.seed)
  batches = []
  for _ in range(args.steps):
    b = next(it)
    batches.append({"image": b["image"], **{k: v[b["row"]] for k, v in targets.items()}})
  one_device = parallel.Placement.create(devices=jax.devices()[:1])
  out = {"one": run(config, batches, one_device, False),
         "reversed": run(config, batches, one_device, True),
         "four": run(config, batches, parallel.Placement.create(), False)}
  print(f"{jax.device_count()} devices; batch {config.batch_size}; pretraining losses")
  print(f"{'step':>6} {'one':>12} {'reversed':>12} {'four':>12} {'rel(reversed)':>14} "
        f"{'rel(four)':>10}")
  for s in sorted({1, 2, 3, 5, 10, 20, 50, 100, 150, args.steps} & set(range(1, args.steps + 1))):
    a, r, f = (out[k][s - 1] for k in ("one", "reversed", "four"))
    print(f"{s:>6} {a:>12.7g} {r:>12.7g} {f:>12.7g} {abs(r - a) / a:>14.2e} {abs(f - a) / a:>10.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
