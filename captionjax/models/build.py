"""Model assembly from a config: the CNN, the language model, their parameters.

    cnn, lm, full = make_models(config, vocab_size)
    params, batch_stats, feat_dim = init_params(config, cnn, lm, image_size, max_length, rng)

The captioner's parameters are one dict: {"cnn": ..., **{k: ... for k in LM_KEYS}}.
The CNN runs alone (`cnn`, images -> features) so that it can be frozen,
cached or fine-tuned; `lm` is the Captioner on features (cnn="none"); `full`
is the same captioner with the CNN inside, for a single forward pass.
`config.model.kind` = "ranking" (configs/ranking.py) makes `lm` the alignment
model of models/ranking.py instead (its parameters: `head_keys(config)`;
`full` is None).

Dimensions: B images, H = W image size in pixels, D CNN feature size,
G grid cells a side (SmallVGG's grid pooling).
"""

import jax
import jax.numpy as jnp

LM_KEYS = ("img_embed", "lm")  # the captioner's parameters besides the CNN's
KINDS = ("captioner", "ranking")  # config.model.kind


def model_kind(config) -> str:
  """config.model.kind: "captioner" (absent: the configs before the ranking model) or "ranking"."""
  kind = config.model.get("kind", "captioner")
  if kind not in KINDS:
    raise ValueError(f"config.model.kind: unknown model kind {kind!r} (one of {', '.join(KINDS)})")
  return kind


def head_keys(config) -> tuple:
  """The parameters besides the CNN's: LM_KEYS, or the alignment model's."""
  if model_kind(config) == "ranking":
    from captionjax.models import ranking  # pylint: disable=g-import-not-at-top
    return ranking.SCORE_KEYS
  return LM_KEYS


def images_to_input(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def cnn_variables(params, batch_stats) -> dict:
  """The CNN's flax variables: its parameters, and its BatchNorm statistics if any."""
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def attention_regions(model_config) -> int:
  """P, the regions the LM attends over: the cells of the CNN's pooling grid (0: none)."""
  if not model_config.get("attention", False):
    return 0
  kw = model_config.cnn_kwargs
  if model_config.cnn != "small_vgg" or kw.get("pool") != "grid":
    raise ValueError("config.model.attention needs model.cnn='small_vgg' with "
                     "model.cnn_kwargs.pool='grid' (the regions are its grid cells); "
                     "for other CNNs set --config.model.attention=False")
  return kw.get("grid", 2) ** 2


COMPUTE_DTYPES = ("float32", "bfloat16")  # config.dtype's values


def compute_dtype(config):
  """config.dtype ("float32" or "bfloat16"; absent in older configs: float32) -> the
  models' compute dtype: None for float32 (compute in the parameters' dtype, float32,
  or float64 in the float64 gradient checks), jnp.bfloat16 for mixed precision. The
  parameters are float32 either way."""
  name = config.get("dtype", "float32")
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.dtype={name!r}: must be one of {COMPUTE_DTYPES}")
  return None if name == "float32" else jnp.dtype(name)


def ranking_regions(model_config) -> int:
  """P, the alignment model's regions in a feature vector: SmallVGG's grid cells, else 1
  (VGG16's fc7; its conv5 map [h, w, C] gives its h*w cells whatever this says)."""
  kw = model_config.cnn_kwargs
  return kw.get("grid", 2) ** 2 if model_config.cnn == "small_vgg" and kw.get("pool") == "grid" else 1


def make_models(config, vocab_size: int):
  """(cnn, lm, full): the CNN alone, the captioner on features, the whole captioner.

  `lm` is a Captioner with cnn="none" (img_embed + LSTM); its parameters plus
  the CNN's under "cnn" are exactly the parameters of `full`. For a ranking
  config: (cnn, the alignment model on features, None).
  """
  from captionjax.models import captioner as captioner_lib  # pylint: disable=g-import-not-at-top
  m = config.model
  ranker = model_kind(config) == "ranking"
  kwargs = dict(vocab_size=vocab_size, input_encoding_size=m.input_encoding_size,
                rnn_size=m.rnn_size, num_layers=m.num_layers,
                drop_prob_lm=m.drop_prob_lm, rnn_type=m.rnn_type,
                image_every_step=m.get("image_every_step", False),
                attention_regions=0 if ranker else attention_regions(m),
                dtype=compute_dtype(config))
  cnn_kwargs = m.cnn_kwargs.to_dict()
  if m.get("cnn_weights"):  # imported VGG16 weights: the input normalization they expect
    from captionjax import weights  # pylint: disable=g-import-not-at-top
    if m.cnn != "vgg16":
      raise ValueError(f"config.model.cnn_weights needs config.model.cnn='vgg16', got {m.cnn!r}")
    if "preprocess" not in cnn_kwargs:  # else set in the config (checked when loaded)
      cnn_kwargs.update(weights.model_kwargs(m.cnn_weights))
  if m.cnn not in captioner_lib.CNNS:
    raise ValueError(f"config.model.cnn: unknown CNN {m.cnn!r} (one of {sorted(captioner_lib.CNNS)})")
  cnn = captioner_lib.CNNS[m.cnn](**cnn_kwargs, dtype=kwargs["dtype"])
  if ranker:
    from captionjax.models import ranking  # pylint: disable=g-import-not-at-top
    return cnn, ranking.AlignmentModel(vocab_size, ranking_regions(m), m.input_encoding_size,
                                       m.embed_size, m.get("rectify", True)), None
  lm = captioner_lib.Captioner(cnn=captioner_lib.NO_CNN, **kwargs)
  full = captioner_lib.Captioner(cnn=m.cnn, cnn_kwargs=cnn_kwargs, **kwargs)
  return cnn, lm, full


def init_params(config, cnn, lm, image_size: int, max_length: int, cnn_rng, lm_rng):
  """(params, batch_stats, D): fresh parameters of the captioner for `config`.

  The CNN sees images of `config.crop_size` (or `image_size`) pixels; with
  `config.model.cnn_weights` its parameters are the imported ones.
  """
  size = config.crop_size or image_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  cnn_vars = cnn.init({"params": cnn_rng, "dropout": cnn_rng}, dummy, train=False)
  feat_shape = jax.eval_shape(lambda v: cnn.apply(v, dummy), cnn_vars).shape  # -> [1, D]
  feat_dim = feat_shape[-1]
  lm_vars = lm.init(lm_rng, jnp.zeros((1,) + feat_shape[1:]),
                    jnp.zeros((1, 1, max_length + 2), jnp.int32))
  params = {"cnn": cnn_vars["params"], **lm_vars["params"]}
  if config.model.get("cnn_weights"):
    from captionjax import weights  # pylint: disable=g-import-not-at-top
    params["cnn"] = weights.load_params(config.model.cnn_weights, params["cnn"], cnn.preprocess)
  return params, cnn_vars.get("batch_stats", {}), feat_dim


def object_heads(grid: int, hidden: int = 256):
  """Per-cell object classifiers on grid-pooled CNN features (CNN pretraining).

  A flax module: features [B, G*G*C] -> logits shape [B, G, G, 7], color
  [B, G, G, 7], size [B, G, G, 2]. With `hidden` > 0 a per-cell Dense + ReLU
  comes first; with 0 the heads are linear (the CNN's own per-cell fc layer,
  `cell_fc`, then plays that part, as VGG's classifier sits on fc7).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from captionjax import shapes  # pylint: disable=g-import-not-at-top

  class ObjectHeads(nn.Module):
    @nn.compact
    def __call__(self, feats):
      b = feats.shape[0]
      x = feats.reshape(b, grid, grid, -1)  # -> [B, G, G, C]
      if hidden:
        x = nn.relu(nn.Dense(hidden, name="hidden")(x))
      return {"shape": nn.Dense(len(shapes.SHAPES) + 1, name="shape")(x),
              "color": nn.Dense(len(shapes.COLORS), name="color")(x),
              "size": nn.Dense(len(shapes.SIZES), name="size")(x)}

  return ObjectHeads()
