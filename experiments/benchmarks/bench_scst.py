"""Benchmark: one self-critical step, part by part, against a cross-entropy step.

    python experiments/benchmarks/bench_scst.py --workdir=runs/default

On a trained workdir's model and its training split (cached CNN features, as
the default recipe): the jitted sampler (K samples per image + the greedy
caption), the host's CIDEr-D reward on token ids (+ advantages), the jitted
policy-gradient update (with the mixed objective's cross-entropy term when
`--xe_weight` > 0), and, as the baseline measured in the same run, the
cross-entropy caption step on the same batch size. Each part is compiled and
warmed up first; the figures are medians over `--repeats` steps.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from captionjax import evaluation, inference, input_pipeline, optim, records, scst, steps


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a finished `captionjax train` workdir")
  p.add_argument("--samples", type=int, default=5, help="K, captions sampled per image")
  p.add_argument("--baseline", default=None, choices=scst.BASELINES,
                 help="default: the run's config.scst_baseline")
  p.add_argument("--xe_weight", type=float, default=None,
                 help="the mixed objective's cross-entropy weight (default: the run's config)")
  p.add_argument("--batch_size", type=int, default=0, help="images per step (0: the config's)")
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args()
  model = inference.load_workdir(args.workdir)
  config = model.config  # the run's, with this benchmark's SCST settings
  args.baseline = args.baseline or config.get("scst_baseline", "greedy")
  args.xe_weight = config.get("scst_xe_weight", 0.0) if args.xe_weight is None else args.xe_weight
  config.update({"scst_samples": args.samples, "scst_baseline": args.baseline, "scst_steps": 1,
                 "scst_xe_weight": args.xe_weight,
                 "batch_size": args.batch_size or config.batch_size})
  data_dir = input_pipeline.data_dir_for(config)
  info, vocab = records.load_info(data_dir), model.vocab
  train = input_pipeline.load_config_split(config, data_dir, "train")
  cnn, lm = model.cnn, model.lm
  params = jax.tree_util.tree_map(jnp.asarray, model.params)
  bs = jax.tree_util.tree_map(jnp.asarray, model.batch_stats)
  feats = evaluation.compute_features(cnn, params["cnn"], bs, {"train": train}, 100,
                                      jnp.asarray)["train"]
  t0 = time.perf_counter()
  reward = scst.Reward(train, vocab)
  build_s = time.perf_counter() - t0
  states = optim.TrainStates(config, params, bs, feats.shape[1], jax.random.PRNGKey(0))
  step = scst.Step(cnn, lm, states, config, "features", info["max_length"] + 1, reward,
                   jnp.asarray)
  xe = jax.jit(steps.make_caption_step(cnn, lm, states.tx_lm, states.tx_cnn, "features"),
               donate_argnums=(0,))
  it = input_pipeline.TrainIterator(train, config.batch_size, seq_per_img=config.seq_per_img,
                                    seed=0)
  rng = jax.random.PRNGKey(0)
  times = {"sample": [], "reward": [], "update": [], "scst_step": [], "xe_step": []}
  # Each state owns its arrays: both updates donate their state, and the two
  # states would otherwise share the parameters' buffers.
  own = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
  s_state = own(states.scst(params, bs, 0))
  x_state = own(states.caption(params, bs, 0))
  for i in range(args.repeats + 2):  # 2 warm-up steps (compilation)
    b = next(it)
    batch = {"row": b["row"], "features": jnp.asarray(feats[b["row"]])}
    refs = {"captions": b["captions"], "mask": b["mask"]} if args.xe_weight else {}
    batch.update(refs)
    t0 = time.perf_counter()
    out = jax.block_until_ready(step.sample(s_state, batch, rng))
    t1 = time.perf_counter()
    samples = np.asarray(out["samples"])
    if args.baseline == "greedy":
      r = reward.score(b["row"], np.concatenate([samples, np.asarray(out["greedy"])[:, None]], 1))
      adv, _ = scst.advantages(r[:, :-1], "greedy", r[:, -1])
    else:
      adv, _ = scst.advantages(reward.score(b["row"], samples), "mean")
    t2 = time.perf_counter()
    s_state, m = step.update(s_state, {"samples": jnp.asarray(samples),
                                       "advantage": jnp.asarray(adv, jnp.float32),
                                       "features": out["features"], **refs}, rng)
    jax.block_until_ready(m)
    t3 = time.perf_counter()
    s_state, m = step(s_state, batch, rng)  # the whole step, as training runs it
    jax.block_until_ready(m["loss_sum"])
    t4 = time.perf_counter()
    x_state, m = xe(x_state, {"captions": b["captions"], "mask": b["mask"],
                              "features": batch["features"]}, rng)
    jax.block_until_ready(m)
    t5 = time.perf_counter()
    if i >= 2:
      for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
        times[k].append(v)
  med = {k: float(np.median(v)) for k, v in times.items()}
  b = config.batch_size
  out = {"workdir": args.workdir, "batch_size": b, "samples": args.samples,
         "baseline": args.baseline, "xe_weight": args.xe_weight, "repeats": args.repeats,
         "reward_build_s": round(build_s, 2),
         **{f"{k}_ms": round(1e3 * v, 2) for k, v in med.items()},
         "reward_share_of_step": round(med["reward"] / med["scst_step"], 3),
         "scst_images_per_s": round(b / med["scst_step"], 1),
         "xe_images_per_s": round(b / med["xe_step"], 1),
         "scst_over_xe_time": round(med["scst_step"] / med["xe_step"], 2)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
