"""Jittable, model-agnostic decoders: greedy, sampling and (diverse) beam search.

The model comes in as a function
  step_fn(carry, tokens [N] int32) -> (carry, logits [N, V+1])
where the carry is any pytree whose leaves have leading dimension N (for the
Captioner: `lambda c, t: model.apply(variables, c, t,
method=Captioner.decode_step)` with the carry from `decode_start`). Decoding
starts by feeding START (id 0), as in training. `ensemble_step` turns several
models into one such function (their log-probabilities averaged).

Dimensions:
  B  batch of images
  K  beam size (or samples per image)
  G  beam groups of diverse beam search (K/G beams each)
  N  decoding batch: B, or B*K inside the beam search
  T  max_length, the length of the token buffers
  V  vocabulary size (ids 1..V are words, 0 is END; logits have V+1 classes)

Token buffers are [.., T] int32; after END (id 0) every position holds 0, so a
caption is the ids up to the first 0 (or all T if END never came). All shapes
are static: the loops are `lax.while_loop`s over fixed buffers that stop early
once every sequence is done.

Constraints, in every decoder (a forbidden token gets NEG_INF added to its
log-probability for the choice; the reported log-probabilities stay the
model's own):
  min_length      END is forbidden before that many words (default 1: no
                  empty caption; 0 allows one)
  block_trigrams  a word that would repeat a trigram the caption already holds
  bad_endings     END right after one of these words ("a", "the", "with"...):
                  a bool mask over the ids [V+1] (`bad_ending_mask`), passed
                  in as an array
A caption whose every next token is forbidden (trigrams on a tiny
vocabulary) may end there: END is then allowed.
`DecodeOptions` gathers these and the choice of decoder for `decode`, the one
entry point that callers (steps.make_generate) use.
"""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

END_ID = 0  # END of a caption; also the START input token and padding
START_ID = END_ID
NEG_INF = -1.0e7  # a finite "minus infinity": sums and comparisons stay exact

# Words a caption should not end on (the list of the NeuralTalk-era
# self-critical captioning code bases): END is masked after them.
BAD_ENDINGS = ("a", "an", "the", "with", "in", "on", "of", "at", "to", "for",
               "this", "his", "her", "that")

StepFn = Callable[[Any, jax.Array], Tuple[Any, jax.Array]]


def _batch_size(carry) -> int:
  return jax.tree_util.tree_leaves(carry)[0].shape[0]


# ---------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How to decode; frozen and hashable (a static argument of a jitted function).

  The decoder: beam search of `beam_size` (1 = greedy), diverse when
  `num_groups` > 1; or, with `sample`, `num_samples` draws per image.
  """
  beam_size: int = 2  # K; 1 = greedy (NeuralTalk2's evaluation default is 2)
  length_penalty: float = 0.0  # alpha of `length_normalize` (0: rank by log-probability)
  min_length: int = 1  # END forbidden before this many words (0: empty captions allowed)
  block_trigrams: bool = False  # forbid a word that repeats a trigram of the caption
  bad_endings: Tuple[str, ...] = BAD_ENDINGS  # END forbidden after these words (() = none;
  # also given as "a,the,with" or "none")
  num_groups: int = 1  # G: diverse beam search with K/G beams per group (1 = plain)
  diversity_lambda: float = 0.5  # Hamming diversity penalty between groups
  sample: bool = False  # sample instead of the beam search
  temperature: float = 1.0  # sampling: softmax(logits / temperature)
  top_k: int = 0  # sampling: only the k likeliest tokens (0 = all)
  top_p: float = 1.0  # sampling: only the smallest set holding this mass (nucleus)
  num_samples: int = 1  # sampling: captions per image

  def __post_init__(self):
    object.__setattr__(self, "bad_endings", parse_words(self.bad_endings))
    checks = [
        ("beam_size", self.beam_size >= 1, ">= 1"),
        ("min_length", self.min_length >= 0, ">= 0"),
        ("num_groups", self.num_groups >= 1 and (
            self.sample or self.beam_size % self.num_groups == 0),
         f">= 1 and divide beam_size={self.beam_size}"),
        ("diversity_lambda", self.diversity_lambda >= 0, ">= 0"),
        ("temperature", self.temperature > 0, "> 0"),
        ("top_k", self.top_k >= 0, ">= 0 (0 = no limit)"),
        ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
        ("num_samples", self.num_samples >= 1, ">= 1"),
    ]
    for name, ok, rule in checks:
      if not ok:
        raise ValueError(f"{name}={getattr(self, name)!r}: must be {rule}")

  @property
  def num_captions(self) -> int:
    """Captions per image that `decode` returns: the beam, 1 greedy, or the samples."""
    return self.num_samples if self.sample else self.beam_size

  def describe(self) -> str:
    """One line for logs: "beam 2", "sampling 5 per image (top-p 0.9)"..."""
    if self.sample:
      cut = [f"temperature {self.temperature:g}"] if self.temperature != 1 else []
      cut += [f"top-k {self.top_k}"] if self.top_k else []
      cut += [f"top-p {self.top_p:g}"] if self.top_p < 1 else []
      text = f"sampling {self.num_samples} per image" + (f" ({', '.join(cut)})" if cut else "")
    elif self.beam_size == 1:
      text = "greedy"
    else:
      text = f"beam {self.beam_size}"
      if self.num_groups > 1:
        text += f" in {self.num_groups} groups (diversity {self.diversity_lambda:g})"
    extra = [f"min length {self.min_length}"] if self.min_length != 1 else []
    extra += ["trigrams blocked"] if self.block_trigrams else []
    extra += [] if self.bad_endings else ["bad endings allowed"]
    return ", ".join([text] + extra)

  def replace(self, **changes) -> "DecodeOptions":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, config, **changes) -> "DecodeOptions":
    """The options of a training config (its fields of the same names;
    `bad_endings` a comma-separated string); fields it lacks keep the
    defaults, so older configs load."""
    kw = {f.name: config[f.name] for f in dataclasses.fields(cls)
          if f.name in config and f.name != "num_samples"}
    return cls(**{**kw, **changes})


def parse_words(words) -> Tuple[str, ...]:
  """"a,the , with" or a sequence of words -> ("a", "the", "with"); "none" -> ()."""
  if isinstance(words, str):
    words = [] if words.strip().lower() == "none" else words.split(",")
  return tuple(w.strip() for w in words if w.strip())


def bad_ending_mask(words: Sequence[str], word_to_ix: dict,
                    vocab_size: int) -> np.ndarray:
  """bool [V+1]: True at the ids of `words` (those the vocabulary has)."""
  mask = np.zeros(vocab_size + 1, bool)
  for w in words:
    if w in word_to_ix:
      mask[word_to_ix[w]] = True
  return mask


# ---------------------------------------------------------------------------
# Constraints and sampling filters.
# ---------------------------------------------------------------------------


class Constraints(NamedTuple):
  """The constraints of one decoding; `bad_endings` a bool [V+1] or None."""
  min_length: int = 1
  block_trigrams: bool = False
  bad_endings: Optional[jax.Array] = None


def repeated_trigram_mask(i, seqs: jax.Array, v1: int) -> jax.Array:
  """bool [N, V+1]: the words w for which (seqs[i-2], seqs[i-1], w) already
  occurs in seqs[:, :i]. seqs [N, T] int32 holds the tokens before position i."""
  n, t = seqs.shape
  if t < 4:  # no room for a trigram and a later one
    return jnp.zeros((n, v1), bool)
  prev2 = jnp.take(seqs, jnp.maximum(i - 2, 0), axis=1)  # -> [N]
  prev1 = jnp.take(seqs, jnp.maximum(i - 1, 0), axis=1)  # -> [N]
  starts = jnp.arange(t - 2)  # the trigram seqs[j], seqs[j+1], seqs[j+2]
  match = ((seqs[:, :-2] == prev2[:, None]) & (seqs[:, 1:-1] == prev1[:, None])
           & (starts + 2 < i)[None, :])  # -> [N, T-2]: complete and equal
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], match.shape)
  hits = jnp.zeros((n, v1), jnp.int32).at[rows, seqs[:, 2:]].add(
      match.astype(jnp.int32))  # -> [N, V+1]
  return hits > 0


def constraint_penalty(c: Constraints, i, last: jax.Array, seqs: jax.Array,
                       v1: int) -> Optional[jax.Array]:
  """[N, V+1] float32: NEG_INF on the tokens forbidden at position i, else 0.

  i: [] the position being chosen (= the words so far); last [N] the token
  before it (START at 0); seqs [N, T] the tokens so far. None when no
  constraint is on (nothing to add).
  """
  n = last.shape[0]
  end_banned = None
  if c.min_length > 0:
    end_banned = jnp.broadcast_to(i < c.min_length, (n,))
  if c.bad_endings is not None:
    bad = c.bad_endings[last]  # -> [N]
    end_banned = bad if end_banned is None else end_banned | bad
  banned = repeated_trigram_mask(i, seqs, v1) if c.block_trigrams else None
  if end_banned is not None:
    end = jnp.arange(v1)[None, :] == END_ID  # -> [1, V+1]
    end = end & end_banned[:, None]  # -> [N, V+1]
    banned = end if banned is None else banned | end
  if banned is None:
    return None
  if c.block_trigrams:  # every token forbidden (a tiny vocabulary): END wins
    stuck = jnp.all(banned, axis=-1, keepdims=True)  # -> [N, 1]
    banned = banned & ~(stuck & (jnp.arange(v1)[None, :] == END_ID))
  return jnp.where(banned, NEG_INF, 0.0).astype(jnp.float32)


def _add(logits, penalty):
  """logits [N, V+1] plus a penalty [N, V+1] (None: the logits unchanged)."""
  return logits if penalty is None else logits.astype(jnp.float32) + penalty


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, penalty: Optional[jax.Array] = None
                  ) -> jax.Array:
  """[N, V+1] -> logits / temperature + penalty, NEG_INF outside the top-k
  and the nucleus.

  The penalty (`constraint_penalty`'s) comes first, so that the filters
  choose among the allowed tokens. top_k > 0 keeps the k likeliest tokens
  (ties at the k-th all kept); top_p < 1 then keeps the smallest set of
  likeliest tokens whose probability (after temperature and top-k) reaches
  top_p, always at least one.
  """
  x = _add(logits.astype(jnp.float32) / temperature, penalty)
  if 0 < top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][:, -1:]  # -> [N, 1]
    x = jnp.where(x < kth, NEG_INF, x)
  if top_p < 1.0:
    desc = -jnp.sort(-x, axis=-1)  # -> [N, V+1], likeliest first
    p = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(p, axis=-1) - p  # of the likelier tokens
    cutoff = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1,
                     keepdims=True)  # -> [N, 1]: the last token kept
    x = jnp.where(x < cutoff, NEG_INF, x)
  return x


def ensemble_step(step_fns: Sequence[StepFn]) -> StepFn:
  """One step function of several models sharing a vocabulary.

  The carry is the tuple of the models' carries; the logits are the mean of
  their log-softmaxes (the log of the geometric mean of their distributions,
  up to a constant that the decoders' log-softmax removes).
  """
  def step_fn(carry, tokens):
    outs = [fn(c, tokens) for fn, c in zip(step_fns, carry)]
    logp = [jax.nn.log_softmax(l.astype(jnp.float32), axis=-1) for _, l in outs]
    return tuple(c for c, _ in outs), sum(logp) / len(logp)  # -> [N, V+1]
  return step_fn


# ---------------------------------------------------------------------------
# Greedy decoding and sampling.
# ---------------------------------------------------------------------------


def _decode_one_token_at_a_time(step_fn: StepFn, carry, max_length: int,
                                choose: Callable[..., jax.Array],
                                constraints: Constraints,
                                rng: Optional[jax.Array] = None):
  """Shared loop: choose(logits [N, V+1], penalty, rng) -> tokens [N] int32.

  `penalty` is `constraint_penalty`'s (None when no constraint is on);
  `rng` is None for greedy decoding (then `choose` gets None: no random bits
  to generate or compile). Returns (tokens [N, T] int32, logprobs [N]), the
  logprobs being the sum of the model's log-softmax of the chosen tokens up
  to and including the first END.
  """
  n = _batch_size(carry)

  def cond(state):
    i, _, _, _, _, done, _ = state
    return (i < max_length) & ~jnp.all(done)

  def body(state):
    i, carry, last, tokens, logprobs, done, rng = state
    step_rng = None
    if rng is not None:
      rng, step_rng = jax.random.split(rng)
    carry, logits = step_fn(carry, last)  # -> [N, V+1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    penalty = constraint_penalty(constraints, i, last, tokens, logits.shape[-1])
    new = choose(logits, penalty, step_rng)  # -> [N]
    new = jnp.where(done, END_ID, new).astype(jnp.int32)
    new_logp = jnp.take_along_axis(logp, new[:, None], axis=-1)[:, 0]  # -> [N]
    logprobs = logprobs + jnp.where(done, 0.0, new_logp)
    tokens = tokens.at[:, i].set(new)
    done = done | (new == END_ID)
    return i + 1, carry, new, tokens, logprobs, done, rng

  state = (jnp.array(0, jnp.int32), carry,
           jnp.full((n,), START_ID, jnp.int32),  # last tokens [N]
           jnp.full((n, max_length), END_ID, jnp.int32),  # tokens [N, T]
           jnp.zeros((n,), jnp.float32),  # logprobs [N]
           jnp.zeros((n,), bool),  # done [N]
           rng)
  state = jax.lax.while_loop(cond, body, state)
  return state[3], state[4]


def greedy(step_fn: StepFn, carry, max_length: int, *, min_length: int = 1,
           block_trigrams: bool = False, bad_endings: Optional[jax.Array] = None
           ) -> Tuple[jax.Array, jax.Array]:
  """Argmax decoding (of the allowed tokens: see the module's constraints).

  Args:
    step_fn: (carry, tokens [B]) -> (carry, logits [B, V+1]).
    carry: the state after the image step, leaves [B, ...].
    max_length: T, the most tokens generated (END included).
    min_length, block_trigrams, bad_endings: the constraints.
  Returns:
    tokens [B, T] int32 (0 after END) and logprobs [B], the summed
    log-probabilities of the emitted tokens, END included; a caption that
    reaches T tokens without END stops there.
  """
  choose = lambda logits, penalty, _: jnp.argmax(_add(logits, penalty), axis=-1)
  return _decode_one_token_at_a_time(
      step_fn, carry, max_length, choose,
      Constraints(min_length, block_trigrams, bad_endings))


def sample(step_fn: StepFn, carry, rng: jax.Array, max_length: int,
           temperature: float = 1.0, *, top_k: int = 0, top_p: float = 1.0,
           min_length: int = 1, block_trigrams: bool = False,
           bad_endings: Optional[jax.Array] = None
           ) -> Tuple[jax.Array, jax.Array]:
  """Samples from softmax(logits / temperature), cut by `filter_logits`'s
  top_k and top_p, over the allowed tokens.

  Returns tokens [B, T] int32 and logprobs [B]. The logprobs are under the
  model's own distribution (temperature 1, no filter), not the one we sample
  from, so they compare with those of `greedy` and `beam_search` at any
  setting. They carry no gradient use: recompute them with the model for
  a policy-gradient loss.
  """
  def choose(logits, penalty, step_rng):
    x = filter_logits(logits, temperature, top_k, top_p, penalty)
    return jax.random.categorical(step_rng, x, axis=-1)
  return _decode_one_token_at_a_time(
      step_fn, carry, max_length, choose,
      Constraints(min_length, block_trigrams, bad_endings), rng)


# ---------------------------------------------------------------------------
# Beam search.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class BeamState:
  """The loop state of `beam_search`.

  With G groups, beams g*K/G .. (g+1)*K/G - 1 are group g, alive and finished
  alike. A score at or below NEG_INF / 2 is no caption: a placeholder or the
  extension by a forbidden token.
  """
  cur_index: jax.Array  # []: the position being decoded, 0..T
  live_tokens: jax.Array  # [B, K]: the last token of each alive beam
  live_seqs: jax.Array  # [B, K, T] int32: alive beams (0 after cur_index)
  live_logprobs: jax.Array  # [B, K]: their summed model log-probabilities
  live_scores: jax.Array  # [B, K]: what ranks them, best first in each group:
  # live_logprobs minus the diversity penalties (the same for G = 1)
  finished_seqs: jax.Array  # [B, K, T] int32: finished beams
  finished_scores: jax.Array  # [B, K]: their ranking scores (length-normalized)
  finished_logprobs: jax.Array  # [B, K]: their model log-probabilities (normalized)
  finished_flags: jax.Array  # [B, K] bool: False for empty slots
  carry: Any  # the model state of the alive beams, leaves [B*K, ...]


_BEAM_FIELDS = ("live_tokens", "live_seqs", "live_logprobs", "live_scores",
                "finished_seqs", "finished_scores", "finished_logprobs",
                "finished_flags")  # the [B, K, ...] fields


class _Candidates(NamedTuple):
  """The C = 2K' best extensions of a group's K' beams."""
  seqs: jax.Array  # [B, C, T] int32
  tokens: jax.Array  # [B, C] int32: the token added
  parents: jax.Array  # [B, C]: the beam (in the group) it extends
  scores: jax.Array  # [B, C]: summed ranking score
  logprobs: jax.Array  # [B, C]: summed model log-probability
  finished: jax.Array  # [B, C] bool: a caption ending here (END, or length T)


def length_normalize(logprobs: jax.Array, length, alpha: float) -> jax.Array:
  """Score of a caption: logprob / length ** alpha (alpha 0: no change).

  `length` counts the generated tokens, END included. alpha=1 is the average
  log-probability per token; values in 0..1 trade off the bias of the raw
  sum of log-probabilities towards short captions.
  """
  if alpha == 0.0:
    return logprobs
  return logprobs / jnp.asarray(length, jnp.float32) ** alpha


def _gather_beams(tree, beam_indices: jax.Array):
  """Picks beams: leaves [B, K_old, ...] -> [B, K_new, ...] by [B, K_new]."""
  def gather(x):
    idx = beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)
  return jax.tree_util.tree_map(gather, tree)


def _flat_to_beams(tree, batch_size: int, beam_size: int):
  """Leaves [B*K, ...] -> [B, K, ...]."""
  return jax.tree_util.tree_map(
      lambda x: x.reshape((batch_size, beam_size) + x.shape[1:]), tree)


def _beams_to_flat(tree):
  """Leaves [B, K, ...] -> [B*K, ...]."""
  return jax.tree_util.tree_map(
      lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), tree)


def _top_candidates(group: BeamState, logp: jax.Array,
                    penalty: Optional[jax.Array]) -> _Candidates:
  """The 2K' best extensions of a group's K' alive beams by ranking score
  (the top-2K trick: at most K' of them end with END, one per beam, so at
  least K' stay alive).

  logp: [B, K', V+1] the model's log-probabilities; penalty: [B, K', V+1]
  or broadcastable (constraints and diversity), or None.
  """
  b, kg, v1 = logp.shape
  i, t = group.cur_index, group.live_seqs.shape[-1]
  scores = group.live_scores[:, :, None] + _add(logp, penalty)  # -> [B, K', V+1]
  top_scores, top_ids = jax.lax.top_k(scores.reshape(b, kg * v1), 2 * kg)  # -> [B, 2K']
  logprobs = group.live_logprobs[:, :, None] + logp  # -> [B, K', V+1]
  top_logprobs = jnp.take_along_axis(logprobs.reshape(b, kg * v1), top_ids, axis=1)
  parents = top_ids // v1  # [B, 2K']
  tokens = (top_ids % v1).astype(jnp.int32)  # [B, 2K']
  seqs = _gather_beams(group.live_seqs, parents)  # -> [B, 2K', T]
  seqs = seqs.at[:, :, i].set(tokens)
  # Finished: ends here, or the buffer is full. A candidate grown from a
  # placeholder or by a forbidden token is no caption: it never finishes.
  real = top_scores > NEG_INF / 2
  finished = ((tokens == END_ID) | (i == t - 1)) & real  # [B, 2K']
  return _Candidates(seqs, tokens, parents, top_scores, top_logprobs, finished)


def _group_step(group: BeamState, logp: jax.Array, penalty, alpha: float):
  """One step of a group of K' beams (`group` without carry).

  Returns the group's new state and the parents [B, K'] (in the group) of its
  new alive beams.
  """
  i, kg = group.cur_index, group.live_tokens.shape[1]
  c = _top_candidates(group, logp, penalty)
  # New alive beams: the K' best candidates that did not finish.
  live_scores, alive = jax.lax.top_k(
      jnp.where(c.finished, NEG_INF, c.scores), kg)  # -> [B, K']
  pick = lambda x, ids: jnp.take_along_axis(x, ids, axis=1)
  # New finished pool: the K' best of the old pool and the new finished, the
  # old pool first so that it wins ties (top_k prefers lower indices).
  new_scores = jnp.where(c.finished, length_normalize(c.scores, i + 1, alpha), NEG_INF)
  new_logprobs = jnp.where(c.finished, length_normalize(c.logprobs, i + 1, alpha),
                           NEG_INF)
  pool = [jnp.concatenate(x, axis=1) for x in (  # -> [B, 3K', ...]
      (group.finished_seqs, c.seqs), (group.finished_scores, new_scores),
      (group.finished_logprobs, new_logprobs), (group.finished_flags, c.finished))]
  _, keep = jax.lax.top_k(pool[1], kg)  # -> [B, K']
  new = BeamState(
      cur_index=i + 1,
      live_tokens=pick(c.tokens, alive),
      live_seqs=_gather_beams(c.seqs, alive),
      live_logprobs=pick(c.logprobs, alive),
      live_scores=live_scores,
      finished_seqs=_gather_beams(pool[0], keep),
      finished_scores=pick(pool[1], keep),
      finished_logprobs=pick(pool[2], keep),
      finished_flags=pick(pool[3], keep),
      carry=None)
  return new, pick(c.parents, alive)


def _beam_step(state: BeamState, step_fn: StepFn, num_groups: int,
               diversity_lambda: float, constraints: Constraints,
               alpha: float) -> BeamState:
  """The loop body of `beam_search`: one model step, then each group in turn.

  Group g's ranking scores lose diversity_lambda per beam of the groups
  before it that chose the same token at this step (Hamming diversity).
  """
  b, k, t = state.live_seqs.shape
  i, kg = state.cur_index, k // num_groups
  carry, logits = step_fn(state.carry, state.live_tokens.reshape(b * k))  # -> [B*K, V+1]
  v1 = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  logp = logp.reshape(b, k, v1)  # -> [B, K, V+1]
  penalty = constraint_penalty(constraints, i, state.live_tokens.reshape(b * k),
                               state.live_seqs.reshape(b * k, t), v1)
  penalty = None if penalty is None else penalty.reshape(b, k, v1)
  used = jnp.zeros((b, v1), jnp.float32)  # -> [B, V+1]: the earlier groups' choices
  groups, parents = [], []
  for g in range(num_groups):
    beams = slice(g * kg, (g + 1) * kg)
    pen = None if penalty is None else penalty[:, beams]
    if g > 0 and diversity_lambda > 0:
      diversity = -diversity_lambda * used[:, None, :]  # -> [B, 1, V+1]
      pen = diversity if pen is None else pen + diversity
    group = state.replace(carry=None, **{
        f: getattr(state, f)[:, beams] for f in _BEAM_FIELDS})
    new, par = _group_step(group, logp[:, beams], pen, alpha)
    groups.append(new)
    parents.append(par + g * kg)
    if g + 1 < num_groups and diversity_lambda > 0:
      real = (new.live_scores > NEG_INF / 2).astype(jnp.float32)  # [B, K']
      used = used.at[jnp.arange(b)[:, None], new.live_tokens].add(real)
  new = groups[0].replace(**{f: jnp.concatenate([getattr(x, f) for x in groups], 1)
                             for f in _BEAM_FIELDS})
  parents = jnp.concatenate(parents, axis=1)  # -> [B, K]
  carry = _flat_to_beams(carry, b, k)  # -> [B, K, ...]
  carry = _beams_to_flat(_gather_beams(carry, parents))  # -> [B*K, ...]
  return new.replace(carry=carry)


def _beam_running(state: BeamState, num_groups: int, alpha: float) -> jax.Array:
  """The loop condition of `beam_search`: [] bool.

  It stops when every group of every image has K' finished beams and no alive
  beam can still beat the worst of them: scores only decrease, so an alive
  beam's best reachable score is its score normalized by the longest length,
  max_length ** alpha (for alpha = 0: its score).
  """
  b, k, t = state.live_seqs.shape
  shape = (b, num_groups, k // num_groups)
  best_alive = state.live_scores.reshape(shape)[:, :, 0]  # -> [B, G]: sorted
  best_reachable = length_normalize(best_alive, t, alpha)
  flags = state.finished_flags.reshape(shape)
  worst_finished = jnp.min(
      jnp.where(flags, state.finished_scores.reshape(shape), -NEG_INF),
      axis=2)  # -> [B, G]
  # jnp.all over images: an image that is done just waits for the others.
  done = jnp.all(jnp.all(flags, axis=2) & (best_reachable <= worst_finished))
  return (state.cur_index < t) & ~done


def beam_search(step_fn: StepFn, carry, beam_size: int, max_length: int,
                length_penalty: float = 0.0, *, num_groups: int = 1,
                diversity_lambda: float = 0.0, min_length: int = 1,
                block_trigrams: bool = False,
                bad_endings: Optional[jax.Array] = None
                ) -> Tuple[jax.Array, jax.Array]:
  """Beam search returning the K best captions of each image, best first.

  Each step extends the K alive beams by every allowed token and keeps the
  2K best candidates (the top-2K trick). The candidates that end go into the
  pool of K finished beams (ranked by their length-normalized score), the
  others become the new alive beams. A beam that reaches max_length without
  END is finished as it is. The loop stops early once no alive beam can beat
  the finished ones.

  With num_groups G > 1 this is diverse beam search (Vijayakumar et al.,
  2016): G groups of K/G beams, each its own beam search with its own pool,
  run one after the other at each step; a group's scores lose
  diversity_lambda for each beam of an earlier group that chose the same
  token at that step. The output is the K finished beams of all groups by
  their model log-probability. G = 1 is the plain beam search.

  Args:
    step_fn: (carry, tokens [N]) -> (carry, logits [N, V+1]), N = B*K.
    carry: the state after the image step, leaves [B, ...]; tiled to [B*K]
      here.
    beam_size: K.
    max_length: T, the most tokens generated (END included).
    length_penalty: alpha of `length_normalize`; 0 ranks by log-probability.
    num_groups, diversity_lambda: G and the diversity penalty.
    min_length, block_trigrams, bad_endings: the constraints.
  Returns:
    tokens [B, K, T] int32 (0 after END) and scores [B, K] (the captions'
    normalized model log-probabilities), sorted best first. Slots with no
    caption (fewer than K possible captions) have score NEG_INF.
  """
  b, k, t = _batch_size(carry), beam_size, max_length
  if k % num_groups:
    raise ValueError(f"num_groups={num_groups} must divide beam_size={k}")
  kg = k // num_groups
  # -> [B*K, ...]: beam j of image i at row i*K + j.
  carry = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0), carry)
  # The beams of a group start identical: only its first is alive at first,
  # so that the first step does not pick the same token K/G times.
  start = jnp.tile(jnp.array(([0.0] + [NEG_INF] * (kg - 1)) * num_groups,
                             jnp.float32), (b, 1))  # -> [B, K]
  state = BeamState(
      cur_index=jnp.array(0, jnp.int32),
      live_tokens=jnp.full((b, k), START_ID, jnp.int32),
      live_seqs=jnp.full((b, k, t), END_ID, jnp.int32),
      live_logprobs=start,
      live_scores=start,
      finished_seqs=jnp.full((b, k, t), END_ID, jnp.int32),
      finished_scores=jnp.full((b, k), NEG_INF, jnp.float32),
      finished_logprobs=jnp.full((b, k), NEG_INF, jnp.float32),
      finished_flags=jnp.zeros((b, k), bool),
      carry=carry)
  constraints = Constraints(min_length, block_trigrams, bad_endings)
  state = jax.lax.while_loop(
      lambda s: _beam_running(s, num_groups, length_penalty),
      lambda s: _beam_step(s, step_fn, num_groups, diversity_lambda,
                           constraints, length_penalty),
      state)
  seqs, scores = state.finished_seqs, state.finished_logprobs
  if num_groups > 1:  # best first over all groups
    scores, order = jax.lax.top_k(scores, k)
    seqs = _gather_beams(seqs, order)
  return seqs, scores


# ---------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------


def decode(step_fn: StepFn, carry, max_length: int, options: DecodeOptions,
           rng: Optional[jax.Array] = None,
           bad_endings: Optional[jax.Array] = None
           ) -> Tuple[jax.Array, jax.Array]:
  """Decodes as `options` say: (tokens [B, C, T] int32, scores [B, C]).

  C = options.num_captions: the beam (best first), 1 for greedy, or the
  samples (in draw order). The scores are the captions' model
  log-probabilities, length-normalized in the beam search as its
  length_penalty says. `rng` is needed to sample; `bad_endings` (bool [V+1],
  from `bad_ending_mask`) when options.bad_endings is not empty.
  """
  o = options
  if o.bad_endings and bad_endings is None:
    raise ValueError("options.bad_endings needs the mask of their ids "
                     "(bad_ending_mask)")
  c = {"min_length": o.min_length, "block_trigrams": o.block_trigrams,
       "bad_endings": bad_endings if o.bad_endings else None}
  if o.sample:
    if rng is None:
      raise ValueError("sampling needs an rng")
    b, s = _batch_size(carry), o.num_samples
    carry = jax.tree_util.tree_map(lambda x: jnp.repeat(x, s, axis=0), carry)
    tokens, logprobs = sample(step_fn, carry, rng, max_length, o.temperature,
                              top_k=o.top_k, top_p=o.top_p, **c)  # -> [B*S, T]
    return tokens.reshape(b, s, max_length), logprobs.reshape(b, s)
  if o.beam_size == 1:
    tokens, logprobs = greedy(step_fn, carry, max_length, **c)
    return tokens[:, None], logprobs[:, None]
  return beam_search(step_fn, carry, o.beam_size, max_length, o.length_penalty,
                     num_groups=o.num_groups,
                     diversity_lambda=o.diversity_lambda, **c)
