"""The captioner: a CNN encoder, NeuralTalk2's image embedding, and the LM.

Dimensions:
  B  batch of images
  S  captions per image
  L  caption buffer length (max_length + 2: START, the words, END)
  N  decoding batch (images, or images times beams)
  D  CNN feature size (or the size of the precomputed features)
  E  input encoding size
  V  vocabulary size (words 1..V; id 0 is END/START/padding; V+1 classes)

Usage:
  model = Captioner(vocab_size=V, cnn="small_vgg")
  variables = model.init(rng, images, captions)
  logits = model.apply(variables, images, captions, train=True,
                       rngs={"dropout": rng}, mutable=["batch_stats"])
  img_emb = model.apply(variables, images, method=Captioner.encode)
  carry = model.apply(variables, img_emb, method=Captioner.decode_start)
  carry, logits = model.apply(variables, carry, tokens,
                              method=Captioner.decode_step)

Rng names: "dropout" (the LM, and VGG16's fc layers). Collections: "params",
and "batch_stats" with cnn="small_vgg" (mutable when train=True).

Mixed precision: `dtype=jnp.bfloat16` computes the CNN, the embeddings and
the LM in bfloat16; the parameters (and BatchNorm statistics) stay float32
whatever the dtype, so checkpoints do not depend on it, and the logits come
out float32 (see lm.py).
"""

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from captionjax.models.lm import LanguageModel
from captionjax.models.vgg import VGG16, SmallVGG

CNNS = {"vgg16": VGG16, "small_vgg": SmallVGG}
NO_CNN = "none"  # the inputs are precomputed CNN features [B, D]


class RegionEmbed(nn.Module):
  """NeuralTalk2's image embedding applied to each region, plus its position.

  x [B, P, C] -> ReLU(x W + b + pos[p]) [B, P, E]: one Dense shared by the
  regions, and a learned [P, E] position table, since captions say where.
  """
  features: int  # E
  dtype: Optional[Any] = None  # compute dtype (parameters stay float32)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    pos = self.param("pos", nn.initializers.normal(0.02), (x.shape[-2], self.features))
    x, kernel, bias, pos = nn.dtypes.promote_dtype(x, kernel, bias, pos, dtype=self.dtype)
    return nn.relu(x @ kernel + bias + pos)  # -> [B, P, E]


class Captioner(nn.Module):
  """CNN -> Dense + ReLU (img_embed) -> LanguageModel, as NeuralTalk2.

  Submodules: `cnn` (absent with cnn="none"), `img_embed`, `lm`.
  """
  vocab_size: int  # V
  cnn: str = "small_vgg"  # "vgg16", "small_vgg" or "none" (cached features)
  cnn_kwargs: Optional[Mapping[str, Any]] = None  # passed to the CNN module
  input_encoding_size: int = 512  # E
  rnn_size: int = 512  # H
  num_layers: int = 1
  drop_prob_lm: float = 0.5
  rnn_type: str = "lstm"
  image_every_step: bool = False  # see LanguageModel.image_every_step
  # P > 0: the CNN features [B, P*C] are P regions of C (a grid-pooled CNN's
  # cells, row-major); each is embedded with its own position and the LM
  # attends over them (LanguageModel.attention). 0: NeuralTalk2's one vector.
  attention_regions: int = 0
  # Compute dtype, e.g. jnp.bfloat16 (None: the parameters' float32). The
  # parameters stay float32; the logits are float32.
  dtype: Optional[Any] = None

  def setup(self):
    self.lm = LanguageModel(
        vocab_size=self.vocab_size,
        input_encoding_size=self.input_encoding_size,
        rnn_size=self.rnn_size,
        num_layers=self.num_layers,
        drop_prob_lm=self.drop_prob_lm,
        rnn_type=self.rnn_type,
        image_every_step=self.image_every_step,
        attention=self.attention_regions > 0,
        dtype=self.dtype)

  @nn.compact
  def encode(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Images [B, h, w, 3] (or features [B, D] with cnn="none") -> [B, E].

    With attention_regions P > 0: -> [B, P, E].

    The CNN runs once per image; callers tile the result over captions/beams.
    """
    x = images
    if self.cnn != NO_CNN:
      if self.cnn not in CNNS:
        raise ValueError(f"cnn must be one of {sorted(CNNS) + [NO_CNN]}, "
                         f"got {self.cnn!r}")
      x = CNNS[self.cnn](**dict(self.cnn_kwargs or {}), dtype=self.dtype, name="cnn")(
          x, train=train)  # -> [B, D]
    if x.ndim != 2:
      raise ValueError(f"the CNN features must be [B, D], got {x.shape}; "
                       "pick a pooled output (e.g. VGG16 output='fc7')")
    p = self.attention_regions
    if p:
      if x.shape[-1] % p:
        raise ValueError(f"attention_regions={p} does not divide the CNN feature size "
                         f"{x.shape[-1]}")
      x = x.reshape(x.shape[0], p, -1)  # -> [B, P, C]
      return RegionEmbed(self.input_encoding_size, dtype=self.dtype,
                         name="img_embed")(x)  # -> [B, P, E]
    return nn.relu(nn.Dense(self.input_encoding_size, dtype=self.dtype, name="img_embed")(x))

  def decode_start(self, img_emb: jax.Array, train: bool = False):
    """img_emb [N, E] -> carry (pytree with leading dimension N)."""
    return self.lm.start(img_emb, train)

  def decode_step(self, carry, tokens: jax.Array, train: bool = False):
    """tokens [N] int32 -> (carry, logits [N, V+1] float32)."""
    return self.lm.step(carry, tokens, train)

  def __call__(self, images: jax.Array, captions: jax.Array,
               train: bool = False) -> jax.Array:
    """images [B, ...], captions [B, S, L] int32 -> logits [B, S, L-1, V+1] float32.

    logits[b, s, t] predicts captions[b, s, t+1]: inputs are
    captions[..., :-1] (START, the words, END, padding), targets
    captions[..., 1:].
    """
    b, s, l = captions.shape
    img_emb = self.encode(images, train)  # -> [B, E]
    img_emb = jnp.repeat(img_emb, s, axis=0)  # -> [B*S, E]
    inputs = captions[..., :-1].reshape(b * s, l - 1)  # -> [B*S, L-1]
    logits = self.lm(img_emb, inputs, train)  # -> [B*S, L-1, V+1]
    return logits.reshape(b, s, l - 1, -1)  # -> [B, S, L-1, V+1]
