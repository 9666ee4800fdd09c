"""The alignment model: image regions and sentence words in one space.

Karpathy and Fei-Fei's "Deep Visual-Semantic Alignments" (2015) in Flax:
the CNN's regions (here its grid cells; VGG16's conv5 cells, or fc7 as one
region) and the words of a sentence (a bidirectional RNN over it) are
projected into one H-dimensional space; an image-sentence score sums, over
the words, each word's best region's dot product, rectified:

    score(image, sentence) = sum_t max(0, max_p <v_p, s_t>)

trained with the bidirectional max-margin ranking loss over a batch
(`max_margin_loss`).

Dimensions:
  N  images;  P regions an image (G x G grid cells, row-major);  C region features
  M  sentences;  T words a sentence (max_length; 0 = padding after the words)
  E  word embedding size;  H  the joint space (and the RNN's hidden size)
  V  vocabulary size (word ids 1..V)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

SCORE_KEYS = ("region_embed", "sentence_rnn")  # the model's parameters (beside the CNN's "cnn")


def as_regions(feats: jax.Array, regions: int) -> jax.Array:
  """CNN features -> [N, P, C]: a map [N, h, w, C] gives its h*w cells; a
  vector [N, P*C] (SmallVGG's grid pooling, row-major cells) gives P regions."""
  if feats.ndim == 4:
    return feats.reshape(feats.shape[0], -1, feats.shape[-1])
  if feats.ndim != 2 or feats.shape[-1] % regions:
    raise ValueError(f"CNN features {feats.shape} are not {regions} regions")
  return feats.reshape(feats.shape[0], regions, -1)


class RegionEmbed(nn.Module):
  """Regions [N, P, C] -> [N, P, H]: one linear map shared by the regions,
  plus a learned position per region (the sentences say where things are)."""
  features: int  # H
  # The map starts small (variance init_scale / C): from a usual start, the
  # first steps of the max-margin loss drive every rectified dot product below
  # zero, where scores and gradients stay 0 (measured on shapes: within 10
  # steps, even at a learning rate of 1e-4).
  init_scale: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pos = self.param("pos", nn.initializers.normal(0.02), (x.shape[-2], self.features))
    init = nn.initializers.variance_scaling(self.init_scale, "fan_in", "truncated_normal")
    return nn.Dense(self.features, kernel_init=init, name="proj")(x) + pos  # -> [N, P, H]


class SentenceRNN(nn.Module):
  """Words [M, T] -> their vectors [M, T, H] (Karpathy's BRNN, ReLU throughout).

      e_t   = relu(W_e x_t + b_e)                  x_t: the word's embedding
      f_t   = relu(e_t + W_f f_{t-1} + b_f)        forward,  lax.scan
      b_t   = relu(e_t + W_b b_{t+1} + b_b)        backward, lax.scan(reverse=True)
      s_t   = relu(W_d (f_t + b_t) + b_d)

  The backward pass starts at each sentence's last word (its state is reset on
  the padding after the words).
  """
  vocab_size: int  # V
  embed_size: int = 256  # E
  features: int = 256  # H

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    h = self.features
    mask = (tokens > 0).astype(jnp.float32)  # -> [M, T]
    x = nn.Embed(self.vocab_size + 1, self.embed_size, name="embed")(tokens)  # -> [M, T, E]
    e = nn.relu(nn.Dense(h, name="e")(x))  # -> [M, T, H]
    rec = nn.initializers.orthogonal(0.5)
    w_f = self.param("w_f", rec, (h, h))
    w_b = self.param("w_b", rec, (h, h))
    b_f = self.param("b_f", nn.initializers.zeros, (h,))
    b_b = self.param("b_b", nn.initializers.zeros, (h,))
    e_t, m_t = jnp.swapaxes(e, 0, 1), jnp.swapaxes(mask, 0, 1)  # time first: [T, M, H], [T, M]
    zero = jnp.zeros((tokens.shape[0], h), e.dtype)

    def forward(state, inp):
      e_i, _ = inp
      state = nn.relu(e_i + state @ w_f + b_f)
      return state, state

    def backward(state, inp):
      e_i, m_i = inp
      state = nn.relu(e_i + state @ w_b + b_b) * m_i[:, None]  # 0 on padding
      return state, state

    _, f = jax.lax.scan(forward, zero, (e_t, m_t))  # -> [T, M, H]
    _, b = jax.lax.scan(backward, zero, (e_t, m_t), reverse=True)  # -> [T, M, H]
    s = nn.relu(nn.Dense(h, name="out")(jnp.swapaxes(f + b, 0, 1)))  # -> [M, T, H]
    return s * mask[..., None]


def word_region_dots(regions: jax.Array, words: jax.Array) -> jax.Array:
  """regions [N, P, H], words [M, T, H] -> every dot product [M, N, T, P]."""
  return jnp.einsum("mth,nph->mntp", words, regions)


def alignment_scores(regions: jax.Array, words: jax.Array, tokens: jax.Array,
                     rectify: bool = True) -> jax.Array:
  """[M, N]: sum over each sentence's words of max(0, its best region's dot product)
  (rectify=False: of the dot product itself, the paper's simplified score)."""
  best = word_region_dots(regions, words).max(axis=-1)  # -> [M, N, T]
  mask = (tokens > 0).astype(best.dtype)[:, None, :]  # -> [M, 1, T]
  return ((nn.relu(best) if rectify else best) * mask).sum(-1)  # -> [M, N]


def word_alignments(regions: jax.Array, words: jax.Array, rectify: bool = True):
  """For sentence m against image n (paired: regions [K, P, H], words [K, T, H]):
  (each word's grounding score max(0, best dot) [K, T], its best region [K, T])."""
  dots = jnp.einsum("kth,kph->ktp", words, regions)  # -> [K, T, P]
  best = dots.max(-1)
  return (nn.relu(best) if rectify else best), dots.argmax(-1).astype(jnp.int32)


class AlignmentModel(nn.Module):
  """CNN features and sentences -> regions and words in one space, and their scores.

  `__call__(feats [N, D], captions [N, S, L])` is the training view (the
  input pipeline's batch: each image's S captions with START/END columns):
  -> scores [N*S, N] of every sentence (image-major) against every image.
  """
  vocab_size: int  # V
  regions: int = 1  # P when the features are vectors [N, P*C]
  embed_size: int = 256  # E, the word embedding
  features: int = 256  # H, the joint space
  rectify: bool = True  # max(0, dot) per word (False: the dot, which never stops learning)

  def setup(self):
    self.region_embed = RegionEmbed(self.features)
    self.sentence_rnn = SentenceRNN(self.vocab_size, self.embed_size, self.features)

  def embed_images(self, feats: jax.Array) -> jax.Array:
    """CNN features [N, D] (or [N, h, w, C]) -> regions [N, P, H]."""
    return self.region_embed(as_regions(feats, self.regions))

  def embed_sentences(self, tokens: jax.Array) -> jax.Array:
    """Words [M, T] (ids, 0 after the last) -> word vectors [M, T, H] (0 on padding)."""
    return self.sentence_rnn(tokens)

  def __call__(self, feats: jax.Array, captions: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout
    tokens = sentence_tokens(captions)  # -> [N*S, T]
    return alignment_scores(self.embed_images(feats), self.embed_sentences(tokens), tokens,
                            self.rectify)


def sentence_tokens(captions: jax.Array) -> jax.Array:
  """The input pipeline's captions [..., L] (START, words, END, pad) -> words [M, L-2]."""
  return captions[..., 1:-1].reshape(-1, captions.shape[-1] - 2)


def max_margin_loss(scores: jax.Array, image_of: jax.Array, margin: float = 1.0,
                    valid=None):
  """Bidirectional max-margin ranking loss: (sum over positive pairs, their count).

  scores [M, N]: sentence m against image n; image_of [M]: sentence m's image;
  valid [N] (optional): 0 for padding images, which take part in no pair.
  For each positive pair (m, n = image_of[m]):
    image search:    sum over images n' != n of max(0, margin + S[m, n'] - S[m, n])
    sentence search: sum over sentences m' of other images of
                     max(0, margin + S[m', n] - S[m, n])
  """
  m, n = scores.shape
  valid = jnp.ones((n,), scores.dtype) if valid is None else valid.astype(scores.dtype)
  real = valid[image_of]  # the sentence's image is real -> [M]
  pos = jnp.take_along_axis(scores, image_of[:, None], axis=1)[:, 0]  # -> [M]
  other_image = (image_of[:, None] != jnp.arange(n)[None, :]) * valid[None, :]  # -> [M, N]
  images = (nn.relu(margin + scores - pos[:, None]) * other_image).sum(1)  # -> [M]
  col = scores[:, image_of]  # col[m', m] = S[m', image_of[m]] -> [M, M]
  other_sentence = (image_of[:, None] != image_of[None, :]) * real[:, None]  # m' of another image
  sentences = (nn.relu(margin + col - pos[None, :]) * other_sentence).sum(0)  # -> [M]
  return ((images + sentences) * real).sum(), real.sum()
