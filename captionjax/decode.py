"""Jittable, model-agnostic decoders: greedy, sampling and beam search.

The model comes in as a function
  step_fn(carry, tokens [N] int32) -> (carry, logits [N, V+1])
where the carry is any pytree whose leaves have leading dimension N (for the
Captioner: `lambda c, t: model.apply(variables, c, t,
method=Captioner.decode_step)` with the carry from `decode_start`). Decoding
starts by feeding START (id 0), as in training.

Dimensions:
  B  batch of images
  K  beam size
  N  decoding batch: B, or B*K inside the beam search
  T  max_length, the length of the token buffers
  V  vocabulary size (ids 1..V are words, 0 is END; logits have V+1 classes)

Token buffers are [.., T] int32; after END (id 0) every position holds 0, so a
caption is the ids up to the first 0 (or all T if END never came). All shapes
are static: the loops are `lax.while_loop`s over fixed buffers that stop early
once every sequence is done.
"""

from typing import Any, Callable, Optional, Tuple

import flax
import jax
import jax.numpy as jnp

END_ID = 0  # END of a caption; also the START input token and padding
START_ID = END_ID
NEG_INF = -1.0e7  # a finite "minus infinity": sums and comparisons stay exact

StepFn = Callable[[Any, jax.Array], Tuple[Any, jax.Array]]


def _batch_size(carry) -> int:
  return jax.tree_util.tree_leaves(carry)[0].shape[0]


# ---------------------------------------------------------------------------
# Greedy decoding and sampling.
# ---------------------------------------------------------------------------


def _decode_one_token_at_a_time(step_fn: StepFn, carry, max_length: int,
                                choose: Callable[..., jax.Array],
                                rng: Optional[jax.Array] = None):
  """Shared loop: choose(logits [N, V+1], rng) -> tokens [N] int32.

  `rng` is None for greedy decoding (then `choose` gets None: no random bits
  to generate or compile). Returns (tokens [N, T] int32, logprobs [N]), the
  logprobs being the sum of the log-softmax of the chosen tokens up to and
  including the first END.
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
    new = choose(logits, step_rng)  # -> [N]
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


def greedy(step_fn: StepFn, carry, max_length: int
           ) -> Tuple[jax.Array, jax.Array]:
  """Argmax decoding.

  Args:
    step_fn: (carry, tokens [B]) -> (carry, logits [B, V+1]).
    carry: the state after the image step, leaves [B, ...].
    max_length: T, the most tokens generated (END included).
  Returns:
    tokens [B, T] int32 (0 after END) and logprobs [B], the summed
    log-probabilities of the emitted tokens, END included; a caption that
    reaches T tokens without END stops there.
  """
  choose = lambda logits, _: jnp.argmax(logits, axis=-1)
  return _decode_one_token_at_a_time(step_fn, carry, max_length, choose)


def sample(step_fn: StepFn, carry, rng: jax.Array, max_length: int,
           temperature: float = 1.0) -> Tuple[jax.Array, jax.Array]:
  """Samples from softmax(logits / temperature).

  Returns tokens [B, T] int32 and logprobs [B]. The logprobs are under the
  model's own distribution (temperature 1), not the tempered one we sample
  from, so they compare with those of `greedy` and `beam_search` at any
  temperature. They carry no gradient use: recompute them with the model for
  a policy-gradient loss.
  """
  def choose(logits, step_rng):
    return jax.random.categorical(step_rng, logits / temperature, axis=-1)
  return _decode_one_token_at_a_time(step_fn, carry, max_length, choose, rng)


# ---------------------------------------------------------------------------
# Beam search.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class BeamState:
  """The loop state of `beam_search`."""
  cur_index: jax.Array  # []: the position being decoded, 0..T
  live_tokens: jax.Array  # [B, K]: the last token of each alive beam
  live_seqs: jax.Array  # [B, K, T] int32: alive beams (0 after cur_index)
  live_logprobs: jax.Array  # [B, K]: their summed logprobs, best first
  finished_seqs: jax.Array  # [B, K, T] int32: finished beams
  finished_scores: jax.Array  # [B, K]: their scores (length-normalized)
  finished_flags: jax.Array  # [B, K] bool: False for empty slots
  carry: Any  # the model state of the alive beams, leaves [B*K, ...]


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


def beam_search(step_fn: StepFn, carry, beam_size: int, max_length: int,
                length_penalty: float = 0.0) -> Tuple[jax.Array, jax.Array]:
  """Beam search returning the K best captions of each image, best first.

  Each step extends the K alive beams by every token and keeps the 2K best
  candidates by log-probability (the top-2K trick: at most K of them end with
  END, one per beam, so at least K stay alive). The candidates that end go
  into the pool of K finished beams (ranked by their length-normalized
  score), the others become the new alive beams (ranked by log-probability).
  A beam that reaches max_length without END is finished as it is.

  The loop stops when every image has K finished beams and no alive beam can
  still beat the worst of them: log-probabilities only decrease, so an alive
  beam's best reachable score is its log-probability normalized by the
  longest length, max_length ** alpha (for alpha = 0: its logprob).

  Args:
    step_fn: (carry, tokens [N]) -> (carry, logits [N, V+1]), N = B*K.
    carry: the state after the image step, leaves [B, ...]; tiled to [B*K]
      here.
    beam_size: K.
    max_length: T, the most tokens generated (END included).
    length_penalty: alpha of `length_normalize`; 0 ranks by log-probability.
  Returns:
    tokens [B, K, T] int32 (0 after END) and scores [B, K] (normalized
    log-probabilities), sorted best first. Slots with no caption (fewer than
    K possible captions) have score NEG_INF.
  """
  b, k, t = _batch_size(carry), beam_size, max_length
  # -> [B*K, ...]: beam j of image i at row i*K + j.
  carry = jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0), carry)
  # All K beams start identical: only beam 0 is alive at first, so that the
  # first step does not pick the same token K times.
  live_logprobs = jnp.tile(
      jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))  # -> [B, K]
  state = BeamState(
      cur_index=jnp.array(0, jnp.int32),
      live_tokens=jnp.full((b, k), START_ID, jnp.int32),
      live_seqs=jnp.full((b, k, t), END_ID, jnp.int32),
      live_logprobs=live_logprobs,
      finished_seqs=jnp.full((b, k, t), END_ID, jnp.int32),
      finished_scores=jnp.full((b, k), NEG_INF, jnp.float32),
      finished_flags=jnp.zeros((b, k), bool),
      carry=carry)

  def cond(state: BeamState):
    not_at_end = state.cur_index < t
    best_alive = state.live_logprobs[:, 0]  # [B]: alive beams stay sorted
    best_reachable = length_normalize(best_alive, t, length_penalty)
    worst_finished = jnp.min(
        jnp.where(state.finished_flags, state.finished_scores, -NEG_INF),
        axis=1)  # -> [B]
    all_full = jnp.all(state.finished_flags, axis=1)  # -> [B]
    # jnp.all over images: an image that is done just waits for the others.
    done = jnp.all(all_full & (best_reachable <= worst_finished))
    return not_at_end & ~done

  def body(state: BeamState):
    i = state.cur_index
    tokens = state.live_tokens.reshape(b * k)  # -> [B*K]
    carry, logits = step_fn(state.carry, tokens)  # -> [B*K, V+1]
    v1 = logits.shape[-1]  # V+1
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = logp.reshape(b, k, v1)  # -> [B, K, V+1]
    cand = state.live_logprobs[:, :, None] + logp  # -> [B, K, V+1]
    cand = cand.reshape(b, k * v1)  # -> [B, K*(V+1)]

    # The 2K best candidates (top-2K trick).
    top_logprobs, top_ids = jax.lax.top_k(cand, 2 * k)  # -> [B, 2K]
    top_beams = top_ids // v1  # [B, 2K]: the parent beam
    top_tokens = (top_ids % v1).astype(jnp.int32)  # [B, 2K]
    top_seqs = _gather_beams(state.live_seqs, top_beams)  # -> [B, 2K, T]
    top_seqs = top_seqs.at[:, :, i].set(top_tokens)
    # A candidate is finished if it ends here, or if the buffer is full.
    # Candidates grown from the NEG_INF placeholders of the first step (when
    # K*(V+1) is small) are not captions: they never enter the finished pool.
    real = top_logprobs > NEG_INF / 2
    top_finished = ((top_tokens == END_ID) | (i == t - 1)) & real  # [B, 2K]

    # New alive beams: the K best candidates that did not finish.
    alive_logprobs = jnp.where(top_finished, NEG_INF, top_logprobs)  # [B, 2K]
    new_live_logprobs, alive_ids = jax.lax.top_k(alive_logprobs, k)  # -> [B, K]
    new_live_seqs = _gather_beams(top_seqs, alive_ids)  # -> [B, K, T]
    new_live_tokens = jnp.take_along_axis(top_tokens, alive_ids, 1)  # -> [B, K]
    parents = jnp.take_along_axis(top_beams, alive_ids, axis=1)  # -> [B, K]
    carry = _flat_to_beams(carry, b, k)  # -> [B, K, ...]
    carry = _beams_to_flat(_gather_beams(carry, parents))  # -> [B*K, ...]

    # New finished pool: the K best of the old pool and the new finished.
    new_scores = length_normalize(top_logprobs, i + 1, length_penalty)
    new_scores = jnp.where(top_finished, new_scores, NEG_INF)  # [B, 2K]
    # -> [B, 3K, T], [B, 3K], [B, 3K]: the old pool first, so that it wins
    # ties (top_k prefers lower indices).
    pool_seqs = jnp.concatenate([state.finished_seqs, top_seqs], axis=1)
    pool_scores = jnp.concatenate([state.finished_scores, new_scores], axis=1)
    pool_flags = jnp.concatenate([state.finished_flags, top_finished], axis=1)
    _, keep = jax.lax.top_k(pool_scores, k)  # -> [B, K]
    finished_seqs = _gather_beams(pool_seqs, keep)  # -> [B, K, T]
    finished_scores = jnp.take_along_axis(pool_scores, keep, axis=1)
    finished_flags = jnp.take_along_axis(pool_flags, keep, axis=1)

    return BeamState(
        cur_index=i + 1,
        live_tokens=new_live_tokens,
        live_seqs=new_live_seqs,
        live_logprobs=new_live_logprobs,
        finished_seqs=finished_seqs,
        finished_scores=finished_scores,
        finished_flags=finished_flags,
        carry=carry)

  state = jax.lax.while_loop(cond, body, state)
  return state.finished_seqs, state.finished_scores
