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

Mixed precision (`dtype`, e.g. jnp.bfloat16): the matmuls, embeddings and
attention run in `dtype`; the parameters stay float32 (`param_dtype`), and
the gates, the recurrent carry (c, h), the attention softmax and the logits
are float32. With dtype=None every computation is in the parameters' dtype
(float32; float64 for the gradient checks).
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

LSTMCarry = Tuple[jax.Array, jax.Array]  # (c [B, H], h [B, H])


def at_least_f32(x: jax.Array) -> jax.Array:
  """bfloat16/float16 -> float32; float32 and float64 kept."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class LSTMCell(nn.Module):
  """NeuralTalk2's LSTM cell (misc/LSTM.lua).

  One linear map of the input and one of the previous hidden state, summed
  into the 4H pre-activations, split in the order of the Lua code: input gate,
  forget gate, output gate (sigmoids), then the candidate (tanh). No peepholes.

  The input map is a method of its own (`project`) so that teacher forcing
  can apply it to every time step at once, outside the recurrence, and run
  only `recur` step by step (as cuDNN's LSTM does); `__call__` is the two
  together, one step.
  """
  features: int  # H
  dtype: Optional[Any] = None  # the matmuls' dtype; the gates and carry at least float32

  def setup(self):
    self.i2h = nn.Dense(4 * self.features, dtype=self.dtype)
    self.h2h = nn.Dense(4 * self.features, dtype=self.dtype)

  def project(self, x: jax.Array) -> jax.Array:
    """The input side of the pre-activations: x [..., D] -> [..., 4H]."""
    return self.i2h(x)

  def recur(self, carry: LSTMCarry, projected: jax.Array):
    """carry: (c [B, H], h [B, H]); projected = project(x) [B, 4H] ->
    (new carry, h [B, H])."""
    c, h = carry
    sums = (projected + self.h2h(h)).astype(c.dtype)  # -> [B, 4H]
    in_gate, forget_gate, out_gate, candidate = jnp.split(sums, 4, axis=-1)
    c = (nn.sigmoid(forget_gate) * c
         + nn.sigmoid(in_gate) * jnp.tanh(candidate))
    h = nn.sigmoid(out_gate) * jnp.tanh(c)
    return (c, h), h

  def __call__(self, carry: LSTMCarry, x: jax.Array):
    """carry: (c [B, H], h [B, H]); x: [B, D] -> (new carry, h [B, H])."""
    return self.recur(carry, self.project(x))

  @nn.nowrap
  def initial_carry(self, batch_size: int, dtype=jnp.float32) -> LSTMCarry:
    zeros = jnp.zeros((batch_size, self.features), dtype)  # -> [B, H]
    return (zeros, zeros)


class RNNCell(nn.Module):
  """Vanilla tanh RNN cell, as NeuralTalk's: h = tanh(W_x x + W_h h).

  `project` and `recur` split it as LSTMCell's.
  """
  features: int  # H
  dtype: Optional[Any] = None  # the matmuls' dtype; the carry at least float32

  def setup(self):
    self.i2h = nn.Dense(self.features, dtype=self.dtype)
    self.h2h = nn.Dense(self.features, dtype=self.dtype)

  def project(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> W_x x + b [..., H]."""
    return self.i2h(x)

  def recur(self, carry: jax.Array, projected: jax.Array):
    """carry: h [B, H]; projected = project(x) [B, H] -> (new h, h [B, H])."""
    h = jnp.tanh((projected + self.h2h(carry)).astype(carry.dtype))
    return h, h

  def __call__(self, carry: jax.Array, x: jax.Array):
    """carry: h [B, H]; x: [B, D] -> (new h, h [B, H])."""
    return self.recur(carry, self.project(x))

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
  # Compute dtype (jnp.bfloat16 for mixed precision); parameters stay
  # float32. None: the parameters' dtype.
  dtype: Optional[Any] = None

  def setup(self):
    if self.rnn_type not in CELLS:
      raise ValueError(f"rnn_type must be one of {sorted(CELLS)}, "
                       f"got {self.rnn_type!r}")
    # V+1 rows: the words plus id 0 (START on the input side).
    dtype = self.dtype
    self.embed = nn.Embed(self.vocab_size + 1, self.input_encoding_size, dtype=dtype)
    self.cells = [CELLS[self.rnn_type](self.rnn_size, dtype=dtype)
                  for _ in range(self.num_layers)]
    self.dropout = nn.Dropout(self.drop_prob_lm)
    self.logit = nn.Dense(self.vocab_size + 1, dtype=dtype)
    if self.attention:
      self.att_key = nn.Dense(self.input_encoding_size, dtype=dtype)
      self.att_query = nn.Dense(self.input_encoding_size, use_bias=False, dtype=dtype)
      self.att_score = nn.Dense(1, use_bias=False, dtype=dtype)

  def _attend(self, carry, x: jax.Array) -> jax.Array:
    """The attention context [B, E] for word input x [B, E]."""
    cells, regions, keys = carry
    h = cells[-1][1] if self.rnn_type == "lstm" else cells[-1]  # top h [B, H]
    x = jnp.broadcast_to(x, h.shape[:-1] + x.shape[-1:])  # (pair_step: [C, 1, E] -> [C, N, E])
    query = self.att_query(jnp.concatenate([h, x], axis=-1))  # -> [B, E]
    scores = self.att_score(jnp.tanh(keys + query[..., None, :]))[..., 0]  # -> [B, P]
    weights = jax.nn.softmax(at_least_f32(scores), axis=-1)
    # Kept only when "intermediates" is mutable (inference.attention_fn): where this word looked.
    self.sow("intermediates", "attention", weights)  # [B, P]
    return jnp.einsum("...p,...pe->...e", weights, regions)  # -> [B, E], at least float32

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
    carry_dtype = jnp.promote_types(img_emb.dtype, jnp.float32)
    carry = tuple(cell.initial_carry(batch_size, carry_dtype)
                  for cell in self.cells)
    if self.attention:  # img_emb: regions [B, P, E]
      carry, _ = self._core(carry, img_emb.mean(axis=1), train)
      return carry, img_emb, self.att_key(img_emb)
    carry, _ = self._core(carry, img_emb, train)
    return (carry, img_emb) if self.image_every_step else carry

  def step(self, carry, tokens: jax.Array, train: bool = False):
    """One decoding step: tokens [B] int32 -> (carry, logits [B, V+1] float32)."""
    return self._step(carry, self.embed(tokens), train)

  def pair_carry(self, carry, c: int):
    """`start`'s carry for N images -> pair_step's for C sentences x N images:
    the cells' state tiled to [C, N, ...]; the image parts stay [N, ...]."""
    def tile(cells):
      return jax.tree.map(lambda a: jnp.broadcast_to(a[None], (c,) + a.shape), cells)
    if self.attention or self.image_every_step:
      return (tile(carry[0]),) + tuple(carry[1:])
    return tile(carry)

  def pair_step(self, carry, x: jax.Array, targets: jax.Array):
    """One teacher-forced step of C sentences against N images, at inference.

    carry: `pair_carry`'s; x: the C sentences' word embeddings at this step
    [C, 1, E]; targets: their next tokens [C] int32 -> (carry, log P(targets)
    [C, N]). The word side runs once per sentence where the model allows
    (no attention: the first layer's input map runs on [C, 1, E]).
    """
    carry, logits = self._step(carry, x, train=False)  # -> [C, N, V+1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return carry, jnp.take_along_axis(logp, targets[:, None, None], axis=-1)[..., 0]

  def _step(self, carry, x: jax.Array, train: bool):
    """`step` on embedded words x [B, E] (or [C, 1, E] for pair_step)."""
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
    logits = at_least_f32(self.logit(h))  # -> [B, V+1]
    return carry, logits

  def __call__(self, img_emb: jax.Array, inputs: jax.Array,
               train: bool = False) -> jax.Array:
    """Teacher forcing: img_emb [B, E], inputs [B, T] int32 -> logits [B, T, V+1].

    `inputs` starts with START (0); logits[:, t] predicts inputs[:, t+1] (and
    the END after the last word). The same parameters and the same logits as
    a loop of `step` calls, computed as cuDNN's LSTM does: the word
    embeddings, each layer's input map (the cells' `project`) and the output
    layer run once over all T steps as single matmuls, and the scan over
    time carries only the recurrence (`recur`: the hidden-state map and the
    gates), layer by layer. With `attention` a word's input depends on the
    previous step's hidden state (the attention query), so the layer stack
    runs step by step inside the scan; the output layer is still batched.
    Dropout masks are drawn for all steps at once.
    """
    carry = self.start(img_emb, train)
    x = self.embed(inputs)  # -> [B, T, E]
    if self.attention:
      h = self._attention_scan(carry, x, train)  # -> [B, T, H]
    else:
      if self.image_every_step:
        carry, img = carry
        x = x + img[:, None]  # -> [B, T, E]
      h = self._layers_scan(carry, x, train)  # -> [B, T, H]
    h = self.dropout(h, deterministic=not train)
    return at_least_f32(self.logit(h))  # -> [B, T, V+1]

  def _layers_scan(self, carry, x: jax.Array, train: bool) -> jax.Array:
    """Layer by layer: x [B, T, E] -> top hidden states [B, T, H]."""
    for layer, cell in enumerate(self.cells):
      if layer > 0:
        x = self.dropout(x, deterministic=not train)
      projected = cell.project(x)  # -> [B, T, 4H] (LSTM) or [B, T, H]

      def body(module, layer_carry, projected_t, layer=layer):  # [B, 4H]
        return module.cells[layer].recur(layer_carry, projected_t)

      scan = nn.scan(body, variable_broadcast="params",
                     split_rngs={"params": False}, in_axes=1, out_axes=1)
      _, x = scan(self, carry[layer], projected)  # -> [B, T, H]
    return x

  def _attention_scan(self, carry, x: jax.Array, train: bool) -> jax.Array:
    """With attention: word embeddings x [B, T, E] -> top h [B, T, H]."""
    def body(module, carry, x_t):  # x_t: [B, E]
      x_t = x_t + module._attend(carry, x_t)
      cells, h = module._core(carry[0], x_t, train)
      return (cells,) + carry[1:], h

    scan = nn.scan(body, variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True},
                   in_axes=1, out_axes=1)
    _, h = scan(self, carry, x)  # -> [B, T, H]
    return h


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
