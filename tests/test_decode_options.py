"""Tests of the decoding options of captionjax.decode.

Constraints (min_length, block_trigrams, bad_endings), diverse beam search,
the sampling filters (temperature, top-k, top-p) and samples per image,
ensembles, and DecodeOptions, each against a brute-force enumeration or a
plain Python/numpy reference on the tiny random RNN of test_decode.
Dimensions: B images, K beam, G groups, T max_length, V words (V+1 classes).
"""

import collections
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from captionjax import decode
from captionjax.decode import END_ID, NEG_INF
from test_decode import (all_captions, always_end, key, reference_beam_search,
                         sequence_logprob, toy_beam, toy_greedy, toy_model,
                         toy_sample, toy_step)


def np_step(params, h, token):
  """One step of the toy RNN in numpy: (h, log-probabilities [V+1])."""
  h = np.tanh(params["emb"][token] + h @ params["rec"])
  logits = h @ params["out"] + params["bias"]
  return h, logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())


def words_of(seq):
  """The word ids of a caption buffer [T], up to the first END."""
  out = []
  for x in seq:
    if x == END_ID:
      break
    out.append(int(x))
  return out


def allowed(seq, min_length=0, block_trigrams=False, bad=()):
  """Whether a caption buffer [T] obeys the constraints, written plainly:
  one that ends with END has at least min_length words and its last word is
  not in `bad`; no trigram of its words occurs twice."""
  words = words_of(seq)
  ended = len(words) < len(seq)
  if ended and (len(words) < min_length or (words and words[-1] in bad)):
    return False
  trigrams = [tuple(words[j:j + 3]) for j in range(len(words) - 2)]
  return not block_trigrams or len(set(trigrams)) == len(trigrams)


def mask_of(bad, v):
  """bool [V+1] at the ids in `bad`."""
  return jnp.asarray(np.isin(np.arange(v + 1), bad))


def static(rules):
  """The decoders' keyword arguments of a rules dict, hashable for jit."""
  return tuple((k, v) for k, v in rules.items() if k != "bad")


# ---------------------------------------------------------------- constraints


@pytest.mark.parametrize("rules", [
    {"min_length": 3}, {"min_length": 0, "block_trigrams": True},
    {"min_length": 1, "block_trigrams": True, "bad": (1,)},
])
def test_constrained_beam_search_equals_brute_force(rules):
  # V=2, T=6: 127 captions; K=32 = V**(T-1) keeps every alive prefix, so the
  # beam is exhaustive and must return the best captions that obey the rules.
  v, t, k = 2, 6, 32
  params, carry = toy_model(v, batch_size=2, seed=30, sharpness=1.0)
  bad = rules.get("bad", ())
  tokens, scores = toy_beam(params, carry, k, t, constraints=static(rules),
                            bad_endings=mask_of(bad, v) if bad else None)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  seqs = all_captions(v, t)
  seqs = seqs[[allowed(s, **rules) for s in seqs]]
  assert 0 < len(seqs) < 127  # the rules do forbid some captions
  n = min(k, len(seqs))
  for i in range(2):
    lp = np.asarray(sequence_logprob(params, jnp.repeat(carry[i:i + 1], len(seqs), 0),
                                     jnp.asarray(seqs)))
    order = np.argsort(-lp, kind="stable")[:n]
    np.testing.assert_array_equal(tokens[i, :n], seqs[order])
    np.testing.assert_allclose(scores[i, :n], lp[order], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(scores[i, n:], NEG_INF)


def reference_greedy(params, carry, t, min_length=0, block_trigrams=False,
                     bad=()):
  """Greedy decoding in a Python loop, the constraints checked word by word
  (END allowed when they forbid every token)."""
  params = jax.tree_util.tree_map(np.asarray, params)
  out = []
  for i in range(carry.shape[0]):
    h, toks = np.asarray(carry[i]), []
    for pos in range(t):
      h, logp = np_step(params, h, toks[-1] if toks else END_ID)
      banned = set()
      if pos < min_length or (toks and toks[-1] in bad):
        banned.add(END_ID)
      for j in range(pos - 2) if block_trigrams else ():
        if toks[j:j + 2] == toks[pos - 2:pos]:
          banned.add(toks[j + 2])
      if len(banned) == len(logp):  # every token forbidden: END is allowed
        banned.remove(END_ID)
      logp[list(banned)] = -np.inf
      toks.append(int(np.argmax(logp)))
      if toks[-1] == END_ID:
        break
    out.append(toks + [END_ID] * (t - len(toks)))
  return np.array(out, np.int32)


@pytest.mark.parametrize("rules", [
    {"min_length": 4}, {"min_length": 2, "block_trigrams": True, "bad": (1, 3)},
])
def test_constrained_greedy_equals_reference(rules):
  # A sharp random RNN on 3 words: greedy captions run in cycles (repeated
  # trigrams) or stop early, so every rule changes some captions; in the
  # second case some caption reaches a point where every token is forbidden.
  v, t = 3, 12
  params, carry = toy_model(v, batch_size=16, seed=31, sharpness=4.0)
  bad = rules.get("bad", ())
  rules = {"min_length": 0, **rules}
  tokens, logprobs = toy_greedy(params, carry, t, constraints=static(rules),
                                bad_endings=mask_of(bad, v) if bad else None)
  want = reference_greedy(params, carry, t, rules["min_length"],
                          rules.get("block_trigrams", False), bad)
  np.testing.assert_array_equal(np.asarray(tokens), want)
  np.testing.assert_allclose(np.asarray(logprobs),
                             sequence_logprob(params, carry, tokens), rtol=1e-5)
  plain = reference_greedy(params, carry, t)
  assert not np.array_equal(plain, want)  # the rule bites here


def test_repeated_trigram_mask_equals_loop():
  rng = np.random.default_rng(32)
  v, t, n = 3, 9, 64
  seqs = rng.integers(1, v + 1, (n, t)).astype(np.int32)
  for i in range(t + 1):
    got = np.asarray(decode.repeated_trigram_mask(jnp.int32(i), jnp.asarray(seqs), v + 1))
    want = np.zeros((n, v + 1), bool)
    for r in range(n):
      for j in range(i - 2):
        if list(seqs[r, j:j + 2]) == list(seqs[r, i - 2:i]):
          want[r, seqs[r, j + 2]] = True
    np.testing.assert_array_equal(got, want, err_msg=f"position {i}")
    assert i < 3 or want.any()


def test_constrained_samples_obey_the_rules():
  v, t = 3, 10
  params, carry = toy_model(v, batch_size=128, seed=33, sharpness=2.0)
  rules = {"min_length": 2, "block_trigrams": True, "bad": (2,)}
  tokens, logprobs = toy_sample(params, carry, key(6), t, 1.0, constraints=static(rules),
                                bad_endings=mask_of((2,), v))
  assert all(allowed(s, **rules) for s in np.asarray(tokens))
  # The logprobs are the model's own, not those of the masked distribution.
  np.testing.assert_allclose(np.asarray(logprobs),
                             sequence_logprob(params, carry, tokens), rtol=1e-5)
  free, _ = toy_sample(params, carry, key(6), t, 1.0)
  assert not all(allowed(s, **rules) for s in np.asarray(free))  # the rules bite


def end_favouring_step(params):
  return functools.partial(toy_step, params, transform=always_end)


@pytest.mark.parametrize("options", [
    decode.DecodeOptions(beam_size=1), decode.DecodeOptions(beam_size=3),
    decode.DecodeOptions(beam_size=4, num_groups=2),
    decode.DecodeOptions(sample=True, num_samples=2, top_p=0.9),
])
def test_min_length_makes_an_end_favouring_model_say_words(options):
  v, t = 5, 8
  params, carry = toy_model(v, batch_size=3, seed=34)
  mask = mask_of((), v)
  run = jax.jit(lambda c, r, o: decode.decode(end_favouring_step(params), c, t, o, r, mask),
                static_argnums=2)
  # 1 is the default; 3 for the greedy search (min_length 0: test_decode).
  for m in (1, 3) if options.beam_size == 1 and not options.sample else (1,):
    o = options if m == 1 else options.replace(min_length=m)
    tokens, scores = run(carry, key(7), o)
    assert tokens.shape == (3, options.num_captions, t)
    lengths = {len(words_of(s)) for s in np.asarray(tokens).reshape(-1, t)}
    assert lengths == {m}, (m, lengths)  # END as soon as it is allowed
    assert np.all(np.asarray(scores) > NEG_INF / 2)


def test_bad_ending_mask():
  mask = decode.bad_ending_mask(("a", "the", "zebra"), {"a": 1, "red": 2, "the": 3}, 4)
  np.testing.assert_array_equal(mask, [False, True, False, True, False])


# ---------------------------------------------------------------- diverse beam search


def reference_diverse_beam_search(params, carry, k, g, lam, t, alpha):
  """Diverse beam search in plain Python: at each step, group by group, each
  candidate's score loses lam per beam of an earlier group that chose the same
  token at this step; each group keeps 2K/G candidates, its finished ones
  going to its own pool of K/G, the best K/G others staying alive. The pools
  together, by model log-probability, are the output."""
  params = jax.tree_util.tree_map(np.asarray, params)
  kg = k // g
  tokens, scores = [], []
  for i in range(carry.shape[0]):
    alive = [[((), 0.0, 0.0, np.asarray(carry[i]))] for _ in range(g)]
    pools = [[] for _ in range(g)]  # (score, logprob, tokens), normalized
    for pos in range(t):
      used = collections.Counter()
      for gi in range(g):
        cands = []
        for toks, sc, lp, h in alive[gi]:
          h2, logp = np_step(params, h, toks[-1] if toks else END_ID)
          for tok, x in enumerate(logp):
            cands.append((sc + x - lam * used[tok], lp + x, toks + (tok,), h2))
        cands.sort(key=lambda c: -c[0])
        alive[gi] = []
        for sc, lp, toks, h in cands[:2 * kg]:
          if toks[-1] == END_ID or pos == t - 1:
            pools[gi].append((sc / len(toks) ** alpha, lp / len(toks) ** alpha, toks))
          else:
            alive[gi].append((toks, sc, lp, h))
        alive[gi] = alive[gi][:kg]
        used.update(toks[-1] for toks, *_ in alive[gi])
    finished = []
    for pool in pools:
      finished += sorted(pool, key=lambda p: -p[0])[:kg]
    finished.sort(key=lambda p: -p[1])
    tokens.append([list(x) + [END_ID] * (t - len(x)) for _, _, x in finished])
    scores.append([lp for _, lp, _ in finished])
  return np.array(tokens, np.int32), np.array(scores)


@pytest.mark.parametrize("k,g,lam,alpha,seed", [
    (4, 2, 0.5, 0.0, 35), (6, 3, 2.0, 0.7, 36), (3, 3, 1.0, 0.0, 38)])
def test_diverse_beam_search_equals_reference(k, g, lam, alpha, seed):
  v, t = 5, 6
  params, carry = toy_model(v, batch_size=6, seed=seed, end_bias=1.0, sharpness=1.5)
  rules = (("num_groups", g), ("diversity_lambda", lam))
  tokens, scores = toy_beam(params, carry, k, t, alpha, constraints=rules)
  want_tokens, want_scores = reference_diverse_beam_search(params, carry, k, g, lam, t, alpha)
  np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
  np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-5, atol=1e-5)


def test_one_group_is_the_plain_beam_search():
  v, t, k = 5, 6, 3
  params, carry = toy_model(v, batch_size=8, seed=39, end_bias=2.0, sharpness=1.5)
  plain = toy_beam(params, carry, k, t, 0.5)
  one = toy_beam(params, carry, k, t, 0.5,
                 constraints=(("num_groups", 1), ("diversity_lambda", 3.0)))
  for a, b in zip(plain, one):  # bit for bit
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  want_tokens, want_scores = reference_beam_search(params, carry, k, t, 0.5)
  np.testing.assert_array_equal(np.asarray(one[0]), want_tokens)
  np.testing.assert_allclose(np.asarray(one[1]), want_scores, rtol=1e-5, atol=1e-5)


def test_strong_diversity_gives_distinct_first_words():
  # One beam per group and a huge penalty: each group starts with a word no
  # earlier group took (min_length 1: the first token is a word).
  v, t, k = 6, 5, 4
  params, carry = toy_model(v, batch_size=8, seed=40, sharpness=3.0)
  tokens, _ = toy_beam(params, carry, k, t, constraints=(
      ("num_groups", k), ("diversity_lambda", 100.0), ("min_length", 1)))
  first = np.asarray(tokens)[:, :, 0]
  assert all(len(set(row)) == k for row in first)


# ---------------------------------------------------------------- sampling


def reference_filter(logits, temperature, top_k, top_p):
  """bool [V+1]: the tokens `filter_logits` keeps, by sorting in numpy."""
  x = np.asarray(logits, np.float64) / temperature
  order = np.argsort(-x, kind="stable")
  keep = np.zeros(len(x), bool)
  keep[order[:top_k or len(x)]] = True
  p = np.where(keep, np.exp(x - x.max()), 0.0)
  p /= p.sum()
  mass = 0.0
  for j in order:
    if not keep[j] or mass >= top_p:
      keep[j] = False
    mass += p[j]
  return keep


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 3, 1.0), (1.0, 0, 0.9), (0.7, 5, 0.6), (2.0, 0, 0.3), (1.0, 1, 1.0), (1.0, 0, 0.01)])
def test_filter_logits_equals_reference(temperature, top_k, top_p):
  logits = jnp.asarray(np.random.default_rng(41).normal(size=(32, 9)) * 2, jnp.float32)
  got = np.asarray(decode.filter_logits(logits, temperature, top_k, top_p))
  for row, x in zip(got, np.asarray(logits)):
    keep = reference_filter(x, temperature, top_k, top_p)
    np.testing.assert_array_equal(row > NEG_INF / 2, keep)
    np.testing.assert_allclose(row[keep], x[keep] / temperature, rtol=1e-6)


def test_filtered_sample_frequencies():
  # One step, many draws: the frequencies follow the filtered distribution.
  v, n = 5, 20000
  logits = jnp.array([0.3, 1.0, -1.0, 0.5, 2.0, 0.0])
  keep = reference_filter(logits, 1.5, 4, 0.8)
  assert 1 < keep.sum() < 4  # both filters cut
  want = np.where(keep, np.exp(np.asarray(logits) / 1.5), 0.0)
  options = decode.DecodeOptions(sample=True, num_samples=n, temperature=1.5, top_k=4,
                                 top_p=0.8, min_length=0, bad_endings=())
  step_fn = lambda h, tokens: (h, jnp.broadcast_to(logits, (tokens.shape[0], v + 1)))
  tokens, _ = decode.decode(step_fn, jnp.zeros((1, 1)), 1, options, key(8))
  assert tokens.shape == (1, n, 1)
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=v + 1) / n
  np.testing.assert_allclose(freq, want / want.sum(), atol=0.015)


def test_samples_per_image():
  v, t, s = 5, 7, 4
  params, carry = toy_model(v, batch_size=6, seed=42, sharpness=1.0)
  options = decode.DecodeOptions(sample=True, num_samples=s, top_p=0.95, bad_endings=())
  tokens, logprobs = jax.jit(lambda c, r: decode.decode(
      functools.partial(toy_step, params), c, t, options, r))(carry, key(9))
  assert tokens.shape == (6, s, t) and logprobs.shape == (6, s)
  flat = jnp.asarray(tokens).reshape(6 * s, t)
  np.testing.assert_allclose(np.asarray(logprobs).ravel(),
                             sequence_logprob(params, jnp.repeat(carry, s, 0), flat), rtol=1e-5)
  assert all(len(words_of(x)) >= 1 for x in np.asarray(flat))  # min_length 1
  assert any(len({tuple(x) for x in img}) > 1 for img in np.asarray(tokens))


# ---------------------------------------------------------------- ensembles


def test_ensemble_step_averages_log_probabilities():
  v = 6
  (p1, c1), (p2, c2) = toy_model(v, 5, seed=43), toy_model(v, 5, seed=44)
  step = decode.ensemble_step([functools.partial(toy_step, p1), functools.partial(toy_step, p2)])
  tokens = jnp.arange(5, dtype=jnp.int32)
  (h1, h2), logp = step((c1, c2), tokens)
  n1 = jax.tree_util.tree_map(np.asarray, p1)
  n2 = jax.tree_util.tree_map(np.asarray, p2)
  for r in range(5):
    a = np_step(n1, np.asarray(c1[r]), r)[1]
    b = np_step(n2, np.asarray(c2[r]), r)[1]
    np.testing.assert_allclose(np.asarray(logp[r]), (a + b) / 2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(h1), toy_step(p1, c1, tokens)[0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(h2), toy_step(p2, c2, tokens)[0], rtol=1e-6)


@pytest.mark.parametrize("options", [
    decode.DecodeOptions(beam_size=3, block_trigrams=True, length_penalty=0.5),
    decode.DecodeOptions(sample=True, num_samples=3, top_k=4)])
def test_ensemble_of_one_equals_the_model(options):
  v, t = 5, 7
  params, carry = toy_model(v, batch_size=5, seed=45, sharpness=2.0)
  mask = mask_of((1,), v)
  f = functools.partial(toy_step, params)
  alone = jax.jit(lambda c, r: decode.decode(f, c, t, options, r, mask))(carry, key(10))
  ens = jax.jit(lambda c, r: decode.decode(decode.ensemble_step([f]), (c,), t, options, r,
                                           mask))(carry, key(10))
  np.testing.assert_array_equal(np.asarray(ens[0]), np.asarray(alone[0]))
  np.testing.assert_allclose(np.asarray(ens[1]), np.asarray(alone[1]), rtol=1e-5, atol=1e-5)


def test_ensemble_beam_search_equals_brute_force():
  # Exhaustive beam (K = V**(T-1)) over the averaged model, against every
  # caption scored step by step in numpy.
  v, t, k = 3, 4, 27
  (p1, c1), (p2, c2) = toy_model(v, 2, seed=46), toy_model(v, 2, seed=47)
  step = decode.ensemble_step([functools.partial(toy_step, p1), functools.partial(toy_step, p2)])
  tokens, scores = jax.jit(lambda c: decode.beam_search(step, c, k, t, min_length=0))((c1, c2))
  n1 = jax.tree_util.tree_map(np.asarray, p1)
  n2 = jax.tree_util.tree_map(np.asarray, p2)
  seqs = all_captions(v, t)
  for i in range(2):
    lps = []
    for seq in seqs:
      h1, h2, prev, lp = np.asarray(c1[i]), np.asarray(c2[i]), END_ID, 0.0
      for tok in seq:
        (h1, a), (h2, b) = np_step(n1, h1, prev), np_step(n2, h2, prev)
        m = (a + b) / 2
        lp += m[tok] - m.max() - np.log(np.exp(m - m.max()).sum())
        if tok == END_ID:
          break
        prev = tok
      lps.append(lp)
    order = np.argsort(-np.array(lps), kind="stable")[:k]
    np.testing.assert_array_equal(np.asarray(tokens[i]), seqs[order])
    np.testing.assert_allclose(np.asarray(scores[i]), np.array(lps)[order], rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------- DecodeOptions


def test_decode_options():
  a = decode.DecodeOptions(bad_endings=["a", "the"])
  assert a == decode.DecodeOptions(bad_endings=("a", "the")) and hash(a) == hash(
      decode.DecodeOptions(bad_endings=("a", "the")))
  assert decode.DecodeOptions().min_length == 1
  assert decode.DecodeOptions(sample=True, num_samples=5).num_captions == 5
  assert decode.DecodeOptions(beam_size=4).num_captions == 4
  for bad, field in [({"num_groups": 3, "beam_size": 4}, "num_groups=3"),
                     ({"top_p": 0.0}, "top_p=0.0"), ({"temperature": 0}, "temperature=0"),
                     ({"min_length": -1}, "min_length=-1"), ({"num_samples": 0}, "num_samples")]:
    with pytest.raises(ValueError, match=field):
      decode.DecodeOptions(**bad)
  config = ml_collections.ConfigDict({"beam_size": 3, "length_penalty": 0.5,
                                      "bad_endings": "a, with,", "block_trigrams": True,
                                      "learning_rate": 1.0})
  o = decode.DecodeOptions.from_config(config)
  assert (o.beam_size, o.length_penalty, o.bad_endings, o.block_trigrams, o.min_length) == (
      3, 0.5, ("a", "with"), True, 1)
  assert decode.DecodeOptions.from_config(ml_collections.ConfigDict({})) == decode.DecodeOptions()
  assert decode.DecodeOptions.from_config(config, bad_endings="none").bad_endings == ()
  assert "groups" in decode.DecodeOptions(beam_size=4, num_groups=2).describe()


@pytest.mark.parametrize("override,field", [
    ("num_groups=3", "num_groups=3"), ("top_p=0.0", "top_p=0.0"), ("temperature=0.0", "temperature"),
    ("min_length=-1", "min_length"), ("top_k=True", "top_k"), ("diversity_lambda=nan", "diversity")])
def test_config_decoding_fields_are_checked(override, field):
  from captionjax import configs  # pylint: disable=g-import-not-at-top
  with pytest.raises(configs.ConfigError, match=field):
    configs.load_config("default", [override])
  c = configs.load_config("default", ["bad_endings=none", "num_groups=2", "block_trigrams=True"])
  assert decode.DecodeOptions.from_config(c) == decode.DecodeOptions(
      bad_endings=(), num_groups=2, block_trigrams=True)
