"""The language model: NeuralTalk2's LSTM (misc/LanguageModel.lua) in Flax.

Dimensions, used in every docstring and shape comment of this module:
  B  batch (images, or images times captions, or images times beams)
  T  time steps of the input sequence
  V  vocabulary size; the words are ids 1..V and id 0 is END (also used as
     the START input token and as padding), so the output has V+1 classes
  E  input encoding size (word embedding and image embedding)
  H  rnn size
  P  image regions (with `attention`: the cells of a grid-pooled CNN)

A caption is decoded as in NeuralTalk2: the image embedding is fed at a first
step whose output is dropped (`start`), then START (id 0), then the words; the
model predicts the words, then END (`step`, once per token).

The recurrent state (the "carry") is a tuple with one entry per layer: `(c, h)`
for the LSTM, `h` for the plain RNN, each [B, H]; with `image_every_step` or
`attention` it also carries the image (see those fields). Any code that
reorders the batch (beam search) can treat it as a pytree with leading
dimension B.

Dropout uses the rng collection "dropout" (only when `train=True`).
"""

from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

LSTMCarry = Tuple[jax.Array, jax.Array]  # (c [B, H], h [B, H])


class LSTMCell(nn.Module):
  """NeuralTalk2's LSTM cell (misc/LSTM.lua).

  One linear map of the input and one of the previous hidden state, summed
  into the 4H pre-activations, split in the order of the Lua code: input gate,
  forget gate, output gate (sigmoids), then the candidate (tanh). No peepholes.
  """
  features: int  # H

  @nn.compact
  def __call__(self, carry: LSTMCarry, x: jax.Array):
    """carry: (c [B, H], h [B, H]); x: [B, D] -> (new carry, h [B, H])."""
    c, h = carry
    sums = (nn.Dense(4 * self.features, name="i2h")(x)
            + nn.Dense(4 * self.features, name="h2h")(h))  # -> [B, 4H]
    in_gate, forget_gate, out_gate, candidate = jnp.split(sums, 4, axis=-1)
    c = (nn.sigmoid(forget_gate) * c
         + nn.sigmoid(in_gate) * jnp.tanh(candidate))
    h = nn.sigmoid(out_gate) * jnp.tanh(c)
    return (c, h), h

  @nn.nowrap
  def initial_carry(self, batch_size: int, dtype=jnp.float32) -> LSTMCarry:
    zeros = jnp.zeros((batch_size, self.features), dtype)  # -> [B, H]
    return (zeros, zeros)


class RNNCell(nn.Module):
  """Vanilla tanh RNN cell, as NeuralTalk's: h = tanh(W_x x + W_h h)."""
  features: int  # H

  @nn.compact
  def __call__(self, carry: jax.Array, x: jax.Array):
    """carry: h [B, H]; x: [B, D] -> (new h, h [B, H])."""
    h = jnp.tanh(nn.Dense(self.features, name="i2h")(x)
                 + nn.Dense(self.features, name="h2h")(carry))
    return h, h

  @nn.nowrap
  def initial_carry(self, batch_size: int, dtype=jnp.float32) -> jax.Array:
    return jnp.zeros((batch_size, self.features), dtype)  # -> [B, H]


CELLS = {"lstm": LSTMCell, "rnn": RNNCell}


class LanguageModel(nn.Module):
  """A stack of `num_layers` cells over word embeddings, as NeuralTalk2's.

  Dropout as in NeuralTalk2: on the input of every layer but the first, and on
  the top hidden state before the output layer.
  """
  vocab_size: int  # V (the output has V+1 classes, 0 = END)
  input_encoding_size: int = 512  # E
  rnn_size: int = 512  # H
  num_layers: int = 1
  drop_prob_lm: float = 0.5
  rnn_type: str = "lstm"  # "lstm" or "rnn"
  # False: the image is seen at the first step only (NeuralTalk2). True: its
  # embedding is also added to the word embedding at every step (the carry
  # then holds it: (cell carries, img_emb [B, E])).
  image_every_step: bool = False
  # True: the image is P region vectors [B, P, E] instead of one [B, E]. The
  # first step sees their mean; every word step adds a soft-attention average
  # of them (Show, Attend and Tell's additive attention), queried by the
  # previous top hidden state and the current word. The carry then holds
  # (cell carries, regions [B, P, E], their attention keys [B, P, E]).
  attention: bool = False

  def setup(self):
    if self.rnn_type not in CELLS:
      raise ValueError(f"rnn_type must be one of {sorted(CELLS)}, "
                       f"got {self.rnn_type!r}")
    # V+1 rows: the words plus id 0 (START on the input side).
    self.embed = nn.Embed(self.vocab_size + 1, self.input_encoding_size)
    self.cells = [CELLS[self.rnn_type](self.rnn_size)
                  for _ in range(self.num_layers)]
    self.dropout = nn.Dropout(self.drop_prob_lm)
    self.logit = nn.Dense(self.vocab_size + 1)
    if self.attention:
      self.att_key = nn.Dense(self.input_encoding_size)
      self.att_query = nn.Dense(self.input_encoding_size, use_bias=False)
      self.att_score = nn.Dense(1, use_bias=False)

  def _attend(self, carry, x: jax.Array) -> jax.Array:
    """The attention context [B, E] for word input x [B, E]."""
    cells, regions, keys = carry
    h = cells[-1][1] if self.rnn_type == "lstm" else cells[-1]  # top h [B, H]
    query = self.att_query(jnp.concatenate([h, x], axis=-1))  # -> [B, E]
    scores = self.att_score(jnp.tanh(keys + query[:, None]))[..., 0]  # -> [B, P]
    weights = jax.nn.softmax(scores, axis=-1)
    # Kept only when "intermediates" is mutable (inference.attention_fn): where this word looked.
    self.sow("intermediates", "attention", weights)  # [B, P]
    return jnp.einsum("bp,bpe->be", weights, regions)  # -> [B, E]

  def _core(self, carry, x: jax.Array, train: bool):
    """One step of the layer stack: x [B, E] -> (carry, top h [B, H])."""
    new_carry = []
    for layer, cell in enumerate(self.cells):
      if layer > 0:
        x = self.dropout(x, deterministic=not train)
      layer_carry, x = cell(carry[layer], x)
      new_carry.append(layer_carry)
    return tuple(new_carry), x

  def start(self, img_emb: jax.Array, train: bool = False):
    """Runs the first step on the image embedding [B, E] -> carry.

    With `attention`, img_emb is the regions [B, P, E].

    The output of this step is not used (no loss there), as in NeuralTalk2.
    """
    batch_size = img_emb.shape[0]
    carry = tuple(cell.initial_carry(batch_size, img_emb.dtype)
                  for cell in self.cells)
    if self.attention:  # img_emb: regions [B, P, E]
      carry, _ = self._core(carry, img_emb.mean(axis=1), train)
      return carry, img_emb, self.att_key(img_emb)
    carry, _ = self._core(carry, img_emb, train)
    return (carry, img_emb) if self.image_every_step else carry

  def step(self, carry, tokens: jax.Array, train: bool = False):
    """One decoding step: tokens [B] int32 -> (carry, logits [B, V+1])."""
    x = self.embed(tokens)  # -> [B, E]
    if self.attention:
      x = x + self._attend(carry, x)
      cells, h = self._core(carry[0], x, train)
      carry = (cells,) + carry[1:]
    elif self.image_every_step:
      cells, img_emb = carry
      cells, h = self._core(cells, x + img_emb, train)
      carry = (cells, img_emb)
    else:
      carry, h = self._core(carry, x, train)
    h = self.dropout(h, deterministic=not train)
    logits = self.logit(h)  # -> [B, V+1]
    return carry, logits

  def __call__(self, img_emb: jax.Array, inputs: jax.Array,
               train: bool = False) -> jax.Array:
    """Teacher forcing: img_emb [B, E], inputs [B, T] int32 -> [B, T, V+1].

    `inputs` starts with START (0); logits[:, t] predicts inputs[:, t+1] (and
    the END after the last word). The scan runs `step` itself, so it shares
    its parameters and gives the same logits as a loop of `step` calls.
    """
    carry = self.start(img_emb, train)

    def body(module, carry, tokens):  # tokens: [B]
      return module.step(carry, tokens, train)

    scan = nn.scan(body,
                   variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True},
                   in_axes=1, out_axes=1)
    _, logits = scan(self, carry, inputs)  # -> [B, T, V+1]
    return logits


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
