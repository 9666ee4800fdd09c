"""Tests of captionjax.decode: greedy, sampling, beam search.

The reference model is a tiny random RNN written in jnp (its logits depend on
the whole prefix), small enough to enumerate every caption by brute force.
The plain decoders run with min_length=0 (an empty caption allowed) where
they are compared with references that enumerate every caption; the
constraints, diverse beam search, sampling filters and ensembles are in
test_decode_options.py.
Dimensions: B images, K beam, T max_length, V words (V+1 classes, 0 = END).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from captionjax import decode
from captionjax.decode import END_ID, NEG_INF
from captionjax.losses import masked_cross_entropy
from captionjax.models.captioner import Captioner

# Compared with references: full float32 matmuls on any backend (conftest).
pytestmark = pytest.mark.usefixtures("highest_matmul_precision")


def test_matmul_precision_is_pinned():
  # This module's matmuls are full float32 whatever JAX_DEFAULT_MATMUL_PRECISION
  # or the backend's default says (TF32 on GPUs). The CPU ignores the setting,
  # so this checks the compiled program, not the numbers.
  x = jax.ShapeDtypeStruct((4, 4), jnp.float32)
  assert "precision = [HIGHEST, HIGHEST]" in jax.jit(jnp.dot).lower(x, x).as_text()


def key(seed):
  """A PRNG key for the tests. The "rbg" implementation: XLA on this CPU
  takes seconds to compile each program that draws threefry bits, which
  would dominate the test time; the models are indifferent to the choice."""
  return jax.random.key(seed, impl="rbg")


def toy_model(vocab_size, batch_size, hidden=4, sharpness=3.0, seed=0,
              end_bias=0.0):
  """A random RNN: (params, carry [B, hidden]) for `toy_step`.

  end_bias > 0 makes END likelier, so that several beams end at once.
  """
  rng = np.random.default_rng(seed)
  params = {
      "emb": rng.normal(size=(vocab_size + 1, hidden)),
      "rec": rng.normal(size=(hidden, hidden)),
      "out": sharpness * rng.normal(size=(hidden, vocab_size + 1)),
      "bias": np.eye(vocab_size + 1)[END_ID] * end_bias,  # on END only
  }
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32),
                                  params)
  carry = jnp.asarray(rng.normal(size=(batch_size, hidden)), jnp.float32)
  return params, carry


def toy_step(params, h, tokens, transform=None):
  """h [N, hidden], tokens [N] -> (h, logits [N, V+1])."""
  h = jnp.tanh(params["emb"][tokens] + h @ params["rec"])
  logits = h @ params["out"] + params["bias"]
  if transform is not None:
    logits = transform(logits)
  return h, logits


# The decoders, jitted once per shape for every toy model (the parameters
# are arguments, not constants), with an optional static logits transform.
# `constraints` is a dict of static keyword arguments (min_length,
# block_trigrams, num_groups, ...) as a tuple of items; `bad_endings` an array.
@functools.partial(jax.jit, static_argnames=("max_length", "transform",
                                             "constraints"))
def toy_greedy(params, carry, max_length, transform=None, constraints=(),
               bad_endings=None):
  step_fn = functools.partial(toy_step, params, transform=transform)
  kw = {"min_length": 0, **dict(constraints)}
  return decode.greedy(step_fn, carry, max_length, bad_endings=bad_endings,
                       **kw)


@functools.partial(jax.jit, static_argnames=("max_length", "transform",
                                             "constraints"))
def toy_sample(params, carry, rng, max_length, temperature=1.0,
               transform=None, constraints=(), bad_endings=None):
  step_fn = functools.partial(toy_step, params, transform=transform)
  kw = {"min_length": 0, **dict(constraints)}
  return decode.sample(step_fn, carry, rng, max_length, temperature,
                       bad_endings=bad_endings, **kw)


@functools.partial(jax.jit, static_argnames=(
    "beam_size", "max_length", "length_penalty", "transform", "constraints"))
def toy_beam(params, carry, beam_size, max_length, length_penalty=0.0,
             transform=None, constraints=(), bad_endings=None):
  step_fn = functools.partial(toy_step, params, transform=transform)
  kw = {"min_length": 0, **dict(constraints)}
  return decode.beam_search(step_fn, carry, beam_size, max_length,
                            length_penalty, bad_endings=bad_endings, **kw)


def caption_length(tokens):
  """Tokens generated, END included: [..., T] -> [...]."""
  t = tokens.shape[-1]
  is_end = tokens == END_ID
  first_end = np.where(is_end.any(-1), is_end.argmax(-1), t - 1)
  return first_end + 1


@jax.jit
def sequence_logprob(params, carry, tokens):
  """Log-probability of captions [B, T] (up to and with the first END)."""
  inputs = jnp.concatenate(
      [jnp.full_like(tokens[:, :1], END_ID), tokens[:, :-1]], axis=1)

  def body(h, x):
    inp, tok = x
    h, logits = toy_step(params, h, inp)
    logp = jax.nn.log_softmax(logits, -1)
    return h, jnp.take_along_axis(logp, tok[:, None], -1)[:, 0]
  _, logps = jax.lax.scan(body, carry, (inputs.T, tokens.T))  # -> [T, B]
  # Count up to and including the first END.
  ended_before = jnp.cumsum(tokens == END_ID, axis=1) - (tokens == END_ID)
  return jnp.sum(jnp.where(ended_before.T > 0, 0.0, logps), axis=0)


def all_captions(vocab_size, max_length):
  """Every distinct caption as a [M, T] buffer (0 after END)."""
  seqs = []
  for n in range(max_length + 1):  # n words
    for words in itertools.product(range(1, vocab_size + 1), repeat=n):
      if n < max_length:
        seqs.append(list(words) + [END_ID] * (max_length - n))
      else:
        seqs.append(list(words))
  return np.array(seqs, np.int32)


def brute_force_kbest(params, carry, vocab_size, max_length, k, alpha):
  """The K best captions of each image by exhaustive scoring."""
  seqs = all_captions(vocab_size, max_length)  # [M, T]
  m = len(seqs)
  tokens, scores = [], []
  for i in range(carry.shape[0]):
    c = jnp.repeat(carry[i:i + 1], m, axis=0)
    lp = np.asarray(sequence_logprob(params, c, jnp.asarray(seqs)))
    sc = lp / caption_length(seqs) ** alpha
    order = np.argsort(-sc, kind="stable")[:k]
    tokens.append(seqs[order])
    scores.append(sc[order])
  return np.stack(tokens), np.stack(scores)


def reference_beam_search(params, carry, k, max_length, alpha):
  """A plain Python beam search with the same rules (top-2K, finished pool).

  Per image: expand each alive beam by every token, keep the 2K best
  candidates by log-probability; the finished ones (END, or max_length)
  join the pool, the K best others stay alive; stop at max_length.
  """
  params = jax.tree_util.tree_map(np.asarray, params)
  results = []
  for i in range(carry.shape[0]):
    alive = [((), 0.0, np.asarray(carry[i]))]  # (tokens, logprob, state)
    pool = []  # (score, tokens)
    for pos in range(max_length):
      cands = []
      for toks, lp, h in alive:
        h = np.tanh(params["emb"][toks[-1] if toks else END_ID]
                    + h @ params["rec"])
        logits = h @ params["out"] + params["bias"]
        logp = logits - np.log(np.sum(np.exp(logits - logits.max()))) \
            - logits.max()
        for tok in range(len(logp)):
          cands.append((lp + logp[tok], toks + (tok,), h))
      cands.sort(key=lambda c: -c[0])
      alive = []
      for lp, toks, h in cands[:2 * k]:
        if toks[-1] == END_ID or pos == max_length - 1:
          pool.append((lp / len(toks) ** alpha, toks))
        else:
          alive.append((toks, lp, h))
      alive = alive[:k]
    pool.sort(key=lambda p: -p[0])
    pool = pool[:k]
    results.append(([list(t) + [END_ID] * (max_length - len(t))
                     for _, t in pool], [s for s, _ in pool]))
  tokens = np.array([r[0] for r in results], np.int32)
  scores = np.array([r[1] for r in results])
  return tokens, scores


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_beam_search_equals_brute_force(alpha):
  # V=3, T=4: 121 captions. K=27 = V**(T-1) keeps every alive prefix, so the
  # beam is exhaustive and must return exactly the 27 best, in order.
  v, t, k = 3, 4, 27
  params, carry = toy_model(v, batch_size=2, seed=1)
  tokens, scores = toy_beam(params, carry, k, t, alpha)
  want_tokens, want_scores = brute_force_kbest(params, carry, v, t, k, alpha)
  np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("k,alpha,seed,end_bias", [
    (1, 0.0, 2, 0.0), (2, 0.0, 3, 2.0), (3, 0.0, 4, 2.0), (3, 1.0, 5, 2.0)])
def test_beam_search_equals_reference(k, alpha, seed, end_bias):
  # Narrow beams on a larger vocabulary: not exhaustive, so compare with a
  # straightforward Python beam search under the same rules. A likely END
  # puts several finished candidates among the 2K at once.
  v, t = 5, 6
  params, carry = toy_model(v, batch_size=8, seed=seed, end_bias=end_bias,
                            sharpness=1.5)
  tokens, scores = toy_beam(params, carry, k, t, alpha)
  want_tokens, want_scores = reference_beam_search(params, carry, k, t, alpha)
  np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5,
                             atol=1e-5)


def test_beam_scores_are_the_caption_logprobs():
  v, t, k, alpha = 6, 7, 4, 0.5
  params, carry = toy_model(v, batch_size=2, seed=6)
  tokens, scores = toy_beam(params, carry, k, t, alpha)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  assert tokens.shape == (2, k, t) and scores.shape == (2, k)
  assert np.all(np.diff(scores, axis=1) <= 0)  # best first
  for j in range(k):
    lp = sequence_logprob(params, carry, jnp.asarray(tokens[:, j]))
    np.testing.assert_allclose(
        scores[:, j], lp / caption_length(tokens[:, j]) ** alpha, rtol=1e-5)
  # K distinct captions per image.
  for i in range(2):
    assert len({tuple(x) for x in tokens[i]}) == k


def end_peaked(logits):
  """END either far above the best word or far below every word."""
  best = logits.max(-1)
  end_is_max = logits[:, END_ID] >= best
  return logits.at[:, END_ID].set(jnp.where(end_is_max, best + 5.0, -30.0))


def never_end(logits):
  return logits.at[:, END_ID].set(-1e4)


def always_end(logits):
  return logits.at[:, END_ID].set(1e4)


def test_beam_size_one_equals_greedy():
  # With K=1 the top-2K trick still sees a second candidate: an END there
  # enters the finished pool and may beat the greedy caption (so K=1 can do
  # better than greedy). With END either the argmax or far below it, the
  # second candidate is never END, and beam search must follow greedy.
  v, t = 6, 8
  params, carry = toy_model(v, batch_size=4, seed=7, sharpness=1.0)
  g_tokens, g_logprobs = toy_greedy(params, carry, t, transform=end_peaked)
  b_tokens, b_scores = toy_beam(params, carry, 1, t, transform=end_peaked)
  assert np.any(np.asarray(g_tokens) == END_ID)  # some END before T
  np.testing.assert_array_equal(np.asarray(b_tokens[:, 0]),
                                np.asarray(g_tokens))
  np.testing.assert_allclose(np.asarray(b_scores[:, 0]),
                             np.asarray(g_logprobs), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_beam_search_not_worse_than_greedy(k):
  # Guaranteed for K=1 (the greedy path stays alive or is finished); for
  # larger K it is what beam search is for, checked on fixed random models.
  v, t = 8, 10
  for seed in range(3):
    params, carry = toy_model(v, batch_size=4, seed=10 + seed, sharpness=2.0)
    _, g_logprobs = toy_greedy(params, carry, t)
    _, scores = toy_beam(params, carry, k, t)
    assert np.all(np.asarray(scores[:, 0]) >= np.asarray(g_logprobs) - 1e-5)


def test_beam_search_stops_early():
  # A Markov chain (logits from the last token) where every word has
  # probability < 0.3: alive log-probabilities fall fast, so once K captions
  # are finished the loop stops well before max_length. (Its results are
  # those of a full run: see the brute-force and reference tests.)
  v, t, k = 8, 20, 3
  rng = np.random.default_rng(24)
  table = jnp.asarray(0.5 * rng.normal(size=(v + 1, v + 1)), jnp.float32)
  steps = []

  def step_fn(h, tokens):
    jax.debug.callback(lambda: steps.append(1))
    return h, table[tokens]
  carry = jnp.zeros((4, 1))
  assert jax.nn.softmax(table).max() < 0.3
  tokens, _ = jax.jit(
      lambda c: decode.beam_search(step_fn, c, k, t, min_length=0))(carry)
  jax.block_until_ready(tokens)
  assert 0 < len(steps) < t // 2
  assert np.all(np.asarray(tokens)[..., len(steps):] == END_ID)


def test_greedy_and_sample_logprobs_match_the_model():
  v, t = 5, 6
  params, carry = toy_model(v, batch_size=16, seed=20, sharpness=1.0)
  tokens, logprobs = toy_greedy(params, carry, t)
  np.testing.assert_allclose(np.asarray(logprobs),
                             sequence_logprob(params, carry, tokens),
                             rtol=1e-5)
  for temperature in (1.0, 0.5):
    tokens, logprobs = toy_sample(params, carry, key(0), t,
                                  temperature)
    # Logprobs are under the model itself (temperature 1).
    np.testing.assert_allclose(np.asarray(logprobs),
                               sequence_logprob(params, carry, tokens),
                               rtol=1e-5)


def test_sample_at_low_temperature_is_greedy_and_varies_otherwise():
  v, t = 5, 6
  params, carry = toy_model(v, batch_size=16, seed=21, sharpness=1.0)
  g_tokens, _ = toy_greedy(params, carry, t)
  s_tokens, _ = toy_sample(params, carry, key(1), t, 1e-4)
  np.testing.assert_array_equal(np.asarray(s_tokens), np.asarray(g_tokens))
  a, _ = toy_sample(params, carry, key(2), t)
  b, _ = toy_sample(params, carry, key(3), t)
  assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_sampled_token_frequencies():
  # One step, many draws: the empirical frequencies follow softmax(l / temp).
  v, n, temperature = 4, 20000, 2.0
  logits = jnp.array([1.0, -1.0, 0.5, 2.0, 0.0])

  def step_fn(h, tokens):
    return h, jnp.broadcast_to(logits, (tokens.shape[0], v + 1))
  tokens, _ = decode.sample(step_fn, jnp.zeros((n, 1)), key(4), 1,
                            temperature, min_length=0)
  freq = np.bincount(np.asarray(tokens[:, 0]), minlength=v + 1) / n
  np.testing.assert_allclose(freq, jax.nn.softmax(logits / temperature),
                             atol=0.015)


def test_max_length_without_end_and_padding_after_end():
  v, t = 4, 5
  params, carry = toy_model(v, batch_size=3, seed=22)
  # A model that never says END: every caption is exactly T words.
  tokens, _ = toy_greedy(params, carry, t, transform=never_end)
  assert np.all(np.asarray(tokens) > 0)
  b_tokens, b_scores = toy_beam(params, carry, 3, t, transform=never_end)
  assert np.all(np.asarray(b_tokens) > 0)
  assert np.all(np.asarray(b_scores) > NEG_INF / 2)
  # A model that always says END first: one-token captions, rest padding.
  tokens, logprobs = toy_greedy(params, carry, t, transform=always_end)
  assert np.all(np.asarray(tokens) == END_ID)
  np.testing.assert_allclose(np.asarray(logprobs), 0.0, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_tiny_vocabulary_leaves_empty_slots(alpha):
  # V=1, T=2: only 3 captions exist ([END], [1, END], [1, 1]); K=5. The
  # placeholder beams of the first step must not fill the empty slots.
  params, carry = toy_model(1, batch_size=2, seed=23)
  tokens, scores = toy_beam(params, carry, 5, 2, alpha)
  scores = np.asarray(scores)
  np.testing.assert_array_equal(scores[:, 3:], NEG_INF)
  np.testing.assert_array_equal(np.asarray(tokens[:, 3:]), END_ID)
  want_tokens, want_scores = brute_force_kbest(params, carry, 1, 2, 3, alpha)
  np.testing.assert_array_equal(np.asarray(tokens[:, :3]), want_tokens)
  np.testing.assert_allclose(scores[:, :3], want_scores, rtol=1e-5)


def test_decoders_on_the_captioner():
  """Shapes, token ranges, and logprobs equal to the training loss path."""
  v, b, t, k = 11, 3, 7, 4
  model = Captioner(vocab_size=v, cnn="none", input_encoding_size=16,
                    rnn_size=16, num_layers=2)
  feats = jax.random.normal(key(0), (b, 10))
  captions = jnp.zeros((b, 1, t + 1), jnp.int32)
  variables = model.init(key(1), feats, captions)

  def step_fn(carry, tokens):
    return model.apply(variables, carry, tokens, method=Captioner.decode_step)

  @jax.jit
  def run(feats, rng):
    img_emb = model.apply(variables, feats, method=Captioner.encode)
    carry = model.apply(variables, img_emb, method=Captioner.decode_start)
    return (decode.greedy(step_fn, carry, t, min_length=0),
            decode.sample(step_fn, carry, rng, t, min_length=0),
            decode.beam_search(step_fn, carry, k, t, min_length=0))

  (g_tok, g_lp), (s_tok, s_lp), (b_tok, b_sc) = run(feats, key(2))
  assert g_tok.shape == (b, t) and g_tok.dtype == jnp.int32
  assert s_tok.shape == (b, t) and b_tok.shape == (b, k, t)
  assert g_lp.shape == s_lp.shape == (b,) and b_sc.shape == (b, k)
  for tok in (g_tok, s_tok, b_tok):
    tok = np.asarray(tok)
    assert tok.min() >= 0 and tok.max() <= v
    # Zeros after the first END.
    after_end = np.cumsum(tok == END_ID, axis=-1) > 0
    assert np.all(tok[after_end] == END_ID)
  assert np.all(np.asarray(b_sc[:, 0]) >= np.asarray(g_lp) - 1e-5)

  # The decoders' logprobs are minus the teacher-forced loss of their output.
  @jax.jit
  def nll_per_image(tok):  # tok [B, T] -> [B]
    caps = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), tok], axis=1)
    logits = model.apply(variables, feats, caps[:, None])  # -> [B, 1, T, V+1]
    ended_before = jnp.cumsum(tok == END_ID, axis=1) - (tok == END_ID)
    mask = (ended_before == 0).astype(jnp.float32)  # words and first END
    return jax.vmap(lambda l, c, m: masked_cross_entropy(l, c, m)[0])(
        logits[:, 0], caps[:, 1:], mask)

  for tok, lp in ((g_tok, g_lp), (s_tok, s_lp), (b_tok[:, 0], b_sc[:, 0])):
    np.testing.assert_allclose(-np.asarray(nll_per_image(tok)),
                               np.asarray(lp), rtol=1e-4, atol=1e-5)
