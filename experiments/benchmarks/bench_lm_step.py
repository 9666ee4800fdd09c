"""Benchmark: the LM train step on cached fc7 features, before/after and vs PyTorch.

  python experiments/benchmarks/bench_lm_step.py [--batch_sizes=16,128] [--rounds=5]
      [--steps=2] [--output=FILE.json]

One train step is NeuralTalk2's on cached VGG16 features: fc7 [B, 4096] ->
image embedding (Dense + ReLU) -> LSTM 512 over the image step, START and
16 words (T = 17 predicted tokens), output layer over 9,567 words + END,
masked cross-entropy over B x 5 captions, the gradient of every parameter,
element-wise clipping and Adam (NeuralTalk2's betas). Dropout 0.5 as in
training. Variants, timed in the same process, interleaved round by round
(each round runs `--steps` steps of each variant; the figure is the median
over `--rounds` rounds, after a warm-up that compiles):

  "before":  the teacher-forced path as it was, a scan of the one-step
             `decode_step` (every step's input map and output layer inside
             the scan); kept here as PerStepLM;
  "after":   captionjax's LanguageModel: embeddings, the input map and the
             output layer of all T steps as single matmuls outside the scan,
             which carries only the recurrence;
  "pytorch": the same model in PyTorch (nn.Embedding, nn.LSTM over the
             image step and the words, nn.Linear, the same loss and
             optimizer), when torch is importable; its weights are copied
             from the JAX parameters and its loss checked against JAX's.

Also measures this CPU's float32 matmul peak in the same run (the median
GFLOP/s of a jitted 2048 x 2048 `jnp.dot`) and reports each variant's FLOP
rate as a fraction of it. FLOPs are counted analytically (2 per multiply-add;
forward + backward = 3 x forward).

PyTorch is optional: it is not a dependency of captionjax (PyPI's default
Linux wheel brings CUDA libraries, several GB); install a CPU build to get the
third column. Without it the "pytorch" rows are left out.
"""

import argparse
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from captionjax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from captionjax.models.captioner import Captioner  # pylint: disable=g-import-not-at-top,wrong-import-position
from captionjax.models.lm import LanguageModel  # pylint: disable=g-import-not-at-top,wrong-import-position

# NeuralTalk2's sizes on COCO.
V = 9567  # vocabulary (V+1 output classes)
E = 512  # input encoding size
H = 512  # LSTM size
D = 4096  # fc7
S = 5  # captions per image
MAX_LENGTH = 16  # words; L = 18 with START and END, T = L - 1 = 17
L = MAX_LENGTH + 2
T = L - 1
LR, BETA1, BETA2, EPS, CLIP = 4e-4, 0.8, 0.999, 1e-8, 0.1
DROPOUT = 0.5


class PerStepLM(LanguageModel):
  """The teacher-forced path before the restructuring: a scan of `step`
  (embedding, input map, recurrence and output layer, one step at a time)."""

  def __call__(self, img_emb, inputs, train=False):
    carry = self.start(img_emb, train)

    def body(module, carry, tokens):  # tokens: [B]
      return module.step(carry, tokens, train)

    scan = nn.scan(body, variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True}, in_axes=1, out_axes=1)
    _, logits = scan(self, carry, inputs)  # -> [B, T, V+1]
    return logits


class PerStepCaptioner(Captioner):
  """Captioner with PerStepLM: the same parameter tree."""

  def setup(self):
    self.lm = PerStepLM(vocab_size=self.vocab_size, input_encoding_size=self.input_encoding_size,
                        rnn_size=self.rnn_size, num_layers=self.num_layers,
                        drop_prob_lm=self.drop_prob_lm, rnn_type=self.rnn_type)


def step_flops(b: int) -> float:
  """FLOPs of one train step (forward + backward = 3 x forward)."""
  n = b * S  # caption rows
  lstm = n * (T + 1) * (2 * E * 4 * H + 2 * H * 4 * H)  # image step + T tokens
  logits = n * T * 2 * H * (V + 1)
  img = b * 2 * D * E
  return 3.0 * (lstm + logits + img)


def make_batch(b: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(b, D)).astype(np.float32)
  feats = np.maximum(feats, 0.0)  # fc7 is after a ReLU
  captions = np.zeros((b, S, L), np.int32)
  mask = np.zeros((b, S, L), np.float32)
  for i in range(b):
    for j in range(S):
      n = rng.integers(5, MAX_LENGTH + 1)
      captions[i, j, 1:n + 1] = rng.integers(1, V + 1, n)
      mask[i, j, 1:n + 2] = 1.0
  return feats, captions, mask


def jax_step(model):
  """(params, opt_state, feats, captions, mask, rng) -> (params, opt_state, loss), jitted."""
  tx = optax.chain(optax.clip(CLIP), optax.adam(LR, b1=BETA1, b2=BETA2, eps=EPS))

  def loss_fn(params, feats, captions, mask, rng, train=True):
    logits = model.apply({"params": params}, feats, captions, train=train,
                         rngs={"dropout": rng} if train else None)  # -> [B, S, T, V+1]
    loss_sum, count = losses.masked_cross_entropy(logits, captions[..., 1:], mask[..., 1:])
    return loss_sum / count

  def step(params, opt_state, feats, captions, mask, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, feats, captions, mask, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_loss = jax.jit(lambda p, f, c, m: loss_fn(p, f, c, m, None, train=False))
  return tx, jax.jit(step, donate_argnums=(0, 1)), eval_loss


def torch_model(params):
  """The same captioner in PyTorch, with the JAX parameters copied in."""
  import torch  # pylint: disable=g-import-not-at-top

  class TorchCaptioner(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.img_embed = torch.nn.Linear(D, E)
      self.embed = torch.nn.Embedding(V + 1, E)
      self.lstm = torch.nn.LSTM(E, H, batch_first=True)
      self.dropout = torch.nn.Dropout(DROPOUT)
      self.logit = torch.nn.Linear(H, V + 1)

    def forward(self, feats, captions):  # [B, D], [B, S, L] -> [B*S, T, V+1]
      b = feats.shape[0]
      img = torch.relu(self.img_embed(feats)).repeat_interleave(S, dim=0)  # -> [B*S, E]
      words = self.embed(captions[..., :-1].reshape(b * S, T))  # -> [B*S, T, E]
      x = torch.cat([img[:, None], words], dim=1)  # -> [B*S, T+1, E]
      h, _ = self.lstm(x)  # -> [B*S, T+1, H]
      return self.logit(self.dropout(h[:, 1:]))  # -> [B*S, T, V+1]

  model = TorchCaptioner()
  p = jax.tree_util.tree_map(lambda x: torch.from_numpy(np.array(x)), params)
  # captionjax's gate order is (input, forget, output, candidate); PyTorch's
  # is (input, forget, candidate, output).
  order = lambda w: torch.cat([w[..., :2 * H], w[..., 3 * H:], w[..., 2 * H:3 * H]], dim=-1)
  cell = p["lm"]["cells_0"]
  with torch.no_grad():
    model.img_embed.weight.copy_(p["img_embed"]["kernel"].T)
    model.img_embed.bias.copy_(p["img_embed"]["bias"])
    model.embed.weight.copy_(p["lm"]["embed"]["embedding"])
    model.lstm.weight_ih_l0.copy_(order(cell["i2h"]["kernel"]).T)
    model.lstm.bias_ih_l0.copy_(order(cell["i2h"]["bias"]))
    model.lstm.weight_hh_l0.copy_(order(cell["h2h"]["kernel"]).T)
    model.lstm.bias_hh_l0.copy_(order(cell["h2h"]["bias"]))
    model.logit.weight.copy_(p["lm"]["logit"]["kernel"].T)
    model.logit.bias.copy_(p["lm"]["logit"]["bias"])
  return model


def torch_loss(model, feats, captions, mask):
  import torch  # pylint: disable=g-import-not-at-top
  logits = model(feats, captions)  # -> [B*S, T, V+1]
  targets = captions[..., 1:].reshape(-1)
  m = mask[..., 1:].reshape(-1)
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V + 1), targets, reduction="none")
  return (nll * m).sum() / m.sum()


def torch_step_fn(model, feats, captions, mask):
  import torch  # pylint: disable=g-import-not-at-top
  opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(BETA1, BETA2), eps=EPS)
  feats, captions, mask = (torch.from_numpy(x) for x in (feats, captions.astype(np.int64), mask))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = torch_loss(model, feats, captions, mask)
    loss.backward()
    torch.nn.utils.clip_grad_value_(model.parameters(), CLIP)
    opt.step()
    return loss

  def eval_loss():
    model.eval()
    with torch.no_grad():
      out = float(torch_loss(model, feats, captions, mask))
    model.train()
    return out

  return step, eval_loss


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(dot(a, b))
    times.append(time.perf_counter() - t)
  return 2.0 * n ** 3 / statistics.median(times) / 1e9


def bench_batch(b: int, rounds: int, steps: int, use_torch: bool) -> dict:
  feats, captions, mask = make_batch(b)
  models = {"before": PerStepCaptioner(vocab_size=V, cnn="none", input_encoding_size=E,
                                       rnn_size=H, drop_prob_lm=DROPOUT),
            "after": Captioner(vocab_size=V, cnn="none", input_encoding_size=E, rnn_size=H,
                               drop_prob_lm=DROPOUT)}
  params = jax.jit(models["after"].init)(jax.random.key(0), feats[:1], captions[:1])["params"]
  host_params = jax.device_get(params)
  runners, check = {}, {}
  compile_s = {}
  for name, model in models.items():
    tx, step, eval_loss = jax_step(model)
    check[name] = float(eval_loss(params, feats, captions, mask))
    state = {"p": jax.tree_util.tree_map(jnp.array, host_params)}
    state["o"] = tx.init(state["p"])
    rng = jax.random.key(1)

    def run(n, state=state, step=step, rng=rng):
      for i in range(n):
        state["p"], state["o"], loss = step(state["p"], state["o"], feats, captions, mask,
                                            jax.random.fold_in(rng, i))
      jax.block_until_ready(loss)
    t = time.perf_counter()
    run(1)  # compiles
    compile_s[name] = time.perf_counter() - t
    runners[name] = run
  if use_torch:
    import torch  # pylint: disable=g-import-not-at-top
    tmodel = torch_model(host_params)
    tstep, teval = torch_step_fn(tmodel, feats, captions, mask)
    check["pytorch"] = teval()
    t = time.perf_counter()
    tstep()
    compile_s["pytorch"] = time.perf_counter() - t
    runners["pytorch"] = lambda n: [tstep() for _ in range(n)]
    del torch
  for run in runners.values():  # warm-up
    run(1)
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      t = time.perf_counter()
      run(steps)
      times[name].append((time.perf_counter() - t) / steps)
  return {"batch": b, "eval_loss": check, "first_step_s": compile_s,
          "seconds_per_step": {k: statistics.median(v) for k, v in times.items()},
          "all_seconds_per_step": times, "step_gflop": step_flops(b) / 1e9}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_sizes", default="16,128")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--output", default="")
  args = parser.parse_args()
  try:
    import torch  # pylint: disable=g-import-not-at-top
    use_torch = not args.no_torch
    torch_info = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
  except ImportError:
    use_torch, torch_info = False, "torch not installed: no PyTorch rows"
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
        f"{torch_info}; load average {os.getloadavg()[0]:.1f}", flush=True)
  peak = matmul_gflops()
  print(f"float32 matmul peak (2048^3 jnp.dot): {peak:.1f} GFLOP/s", flush=True)
  rows = []
  for b in (int(x) for x in args.batch_sizes.split(",")):
    r = bench_batch(b, args.rounds, args.steps, use_torch)
    r["matmul_peak_gflops"] = peak
    rows.append(r)
    losses_ = ", ".join(f"{k} {v:.6f}" for k, v in r["eval_loss"].items())
    print(f"batch {b} images ({b * S} captions), {r['step_gflop']:.1f} GFLOP/step; "
          f"eval-mode loss on the same weights: {losses_}", flush=True)
    base = r["seconds_per_step"]["before"]
    for name, s in r["seconds_per_step"].items():
      gf = r["step_gflop"] / s
      print(f"  {name:8s} {1 / s:7.2f} steps/s {b / s:8.1f} images/s  {gf:7.1f} GFLOP/s "
            f"({gf / peak:5.1%} of peak)  x{base / s:5.2f} vs before"
            + (f"  x{r['seconds_per_step']['pytorch'] / s:5.2f} vs pytorch"
               if "pytorch" in r["seconds_per_step"] else "")
            + f"  (first step {r['first_step_s'][name]:.1f} s)", flush=True)
  print(f"load average at the end {os.getloadavg()[0]:.1f}")
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
