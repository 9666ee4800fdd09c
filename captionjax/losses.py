"""Losses, returned as sums plus a token count (the trainer divides).

Dimensions: `...` any leading shape (e.g. B, S, T); V the vocabulary size, so
logits have V+1 classes (0 = END).
"""

from typing import Tuple

import jax
import jax.numpy as jnp


def masked_cross_entropy(logits: jax.Array, targets: jax.Array,
                         mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood of `targets` under `logits`.

  Args:
    logits: [..., V+1] unnormalized scores.
    targets: [...] int32 class ids in 0..V.
    mask: [...] float, 1 where the target counts, 0 on padding.
  Returns:
    (loss_sum, token_count): float32 scalars (float64 for float64 logits);
    the mean loss per token is loss_sum / token_count.
  """
  dtype = jnp.promote_types(logits.dtype, jnp.float32)  # bf16 -> f32, f64 kept
  logprobs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  # -> [...]: minus the log-probability of each target.
  nll = -jnp.take_along_axis(logprobs, targets[..., None], -1)[..., 0]
  mask = mask.astype(dtype)
  return jnp.sum(nll * mask), jnp.sum(mask)
