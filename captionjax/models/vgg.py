"""Image encoders: VGG16 (with Keras's layer names) and a small VGG for CPU.

Dimensions:
  B  batch of images
  h, w, C  height, width and channels of a feature map (NHWC throughout)

Dropout uses the rng collection "dropout" (VGG16's fc layers, `train=True`).
SmallVGG has BatchNorm: with `train=True` its "batch_stats" collection must be
mutable.

`dtype` (both CNNs) is the compute dtype, e.g. jnp.bfloat16: convolutions,
dense layers and the output in it; parameters and BatchNorm statistics stay
float32 (BatchNorm computes its statistics in float32).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Simonyan & Zisserman, configuration D: output channels of the convolutions
# of each block; every block ends with a 2x2 max pool.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                (512, 512, 512))
VGG16_FC_SIZE = 4096
IMAGENET_CLASSES = 1000
VGG16_OUTPUTS = ("conv5", "fc7", "logits")

# The input normalizations pretrained VGG16 weights expect, applied by the
# model to RGB inputs in [0, 1] (see VGG16.preprocess):
#   "caffe": Keras's and Caffe's VGG16 (`keras.applications.vgg16.
#     preprocess_input`): RGB -> BGR, scaled to 0..255, minus the ImageNet
#     mean pixel CAFFE_MEAN_BGR;
#   "torch": torchvision's: (x - TORCH_MEAN) / TORCH_STD, RGB, per channel;
#   "none": the input is used as it is.
VGG16_PREPROCESS = ("none", "caffe", "torch")
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


def normalize_input(x: jax.Array, preprocess: str) -> jax.Array:
  """RGB [B, h, w, 3] in [0, 1] -> the input `preprocess` weights expect."""
  if preprocess == "none":
    return x
  if preprocess == "caffe":
    return x[..., ::-1] * 255.0 - jnp.asarray(CAFFE_MEAN_BGR, x.dtype)
  if preprocess == "torch":
    return (x - jnp.asarray(TORCH_MEAN, x.dtype)) / jnp.asarray(TORCH_STD, x.dtype)
  raise ValueError(f"preprocess must be one of {VGG16_PREPROCESS}, got {preprocess!r}")


def vgg16_flops(size: int = 224) -> float:
  """FLOPs (2 x multiply-adds) of VGG16's 13 convolutions, fc6 and fc7 for one image."""
  flops, c_in, side = 0.0, 3, size
  for widths in VGG16_BLOCKS:
    for width in widths:
      flops += 2.0 * side * side * 9 * c_in * width
      c_in = width
    side //= 2
  return flops + 2.0 * side * side * c_in * VGG16_FC_SIZE + 2.0 * VGG16_FC_SIZE ** 2


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))  # -> [B, h/2, w/2, C]


class VGG16(nn.Module):
  """VGG16 with Keras's layer names, so ImageNet weights can be imported.

  Params: {'block1_conv1': {'kernel': [3, 3, 3, 64], 'bias': [64]}, ...,
  'block5_conv3', 'fc1': {'kernel': [25088, 4096], ...}, 'fc2',
  'predictions' (only with output="logits")}. The flatten before fc1 is in
  NHWC order, as Keras's `Flatten` on channels-last maps.

  Input: [B, 224, 224, 3] float32: RGB in [0, 1] when `preprocess` is
  "caffe" or "torch" (the model then normalizes it as the imported weights
  expect: see VGG16_PREPROCESS); already normalized with "none".
  Other sizes work for "conv5" (and for fc7 when fc1 matches h/32*w/32*512).
  Output, by `output`:
    "conv5":  [B, 7, 7, 512] after pool5;
    "fc7":    [B, 4096] after fc2's ReLU (and dropout when training);
    "logits": [B, 1000] ImageNet logits (no softmax).
  """
  output: str = "fc7"
  dropout_rate: float = 0.5
  # Run the convolutions one image at a time (a scan over the batch, i.e.
  # `jax.lax.map`, sharing the parameters); reported faster on CPU at batch 8.
  # Same results as the batched path.
  conv_per_image: bool = False
  # How the input is normalized before the first convolution: "none",
  # "caffe" or "torch" (set from imported weights: captionjax.weights).
  preprocess: str = "none"
  dtype: Optional[Any] = None  # compute dtype (None: the parameters' float32)

  def setup(self):
    if self.output not in VGG16_OUTPUTS:
      raise ValueError(f"output must be one of {VGG16_OUTPUTS}, "
                       f"got {self.output!r}")
    if self.preprocess not in VGG16_PREPROCESS:
      raise ValueError(f"preprocess must be one of {VGG16_PREPROCESS}, "
                       f"got {self.preprocess!r}")
    convs = []
    for block, widths in enumerate(VGG16_BLOCKS, start=1):
      for i, width in enumerate(widths, start=1):
        name = f"block{block}_conv{i}"
        # setattr registers the submodule under its Keras name.
        setattr(self, name, nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype))
        convs.append(name)
      convs.append("pool")
    self._layer_names = tuple(convs)
    if self.output != "conv5":
      self.fc1 = nn.Dense(VGG16_FC_SIZE, dtype=self.dtype)
      self.fc2 = nn.Dense(VGG16_FC_SIZE, dtype=self.dtype)
      self.dropout = nn.Dropout(self.dropout_rate)
    if self.output == "logits":
      self.predictions = nn.Dense(IMAGENET_CLASSES, dtype=self.dtype)

  def conv_features(self, x: jax.Array) -> jax.Array:
    """The 13 convolutions and 5 pools: [B, 224, 224, 3] -> [B, 7, 7, 512]."""
    for name in self._layer_names:
      if name == "pool":
        x = _max_pool(x)
      else:
        x = nn.relu(getattr(self, name)(x))
    return x

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = normalize_input(x, self.preprocess)  # -> [B, 224, 224, 3]
    if self.conv_per_image:
      def one_image(module, carry, image):  # image: [224, 224, 3]
        return carry, module.conv_features(image[None])[0]
      per_image = nn.scan(one_image, variable_broadcast="params",
                          split_rngs={"params": False})
      _, x = per_image(self, None, x)  # -> [B, 7, 7, 512]
    else:
      x = self.conv_features(x)  # -> [B, 7, 7, 512]
    if self.output == "conv5":
      return x
    x = x.reshape(x.shape[0], -1)  # -> [B, 25088], NHWC order as Keras
    x = self.dropout(nn.relu(self.fc1(x)), deterministic=not train)
    x = self.dropout(nn.relu(self.fc2(x)), deterministic=not train)
    if self.output == "fc7":
      return x  # [B, 4096]
    return self.predictions(x)  # -> [B, 1000]


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
  """[B, h, w, C] -> [B, h/factor, w/factor, factor*factor*C]."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // factor, w // factor, factor * factor * c)


SMALL_VGG_POOLS = ("maxmean", "grid", "flatten")


def adaptive_pool(x: jax.Array, grid: int, reduce: str = "max") -> jax.Array:
  """[B, h, w, C] -> [B, g, g, C]: cell (i, j) pools rows floor(i*h/g) to
  ceil((i+1)*h/g) (cells overlap when g does not divide h, as PyTorch's
  adaptive pooling)."""
  op = {"max": jnp.max, "mean": jnp.mean}[reduce]
  h, w = x.shape[1], x.shape[2]
  bounds = lambda n: [(i * n // grid, -(-(i + 1) * n // grid)) for i in range(grid)]
  rows = [jnp.stack([op(x[:, r0:r1, c0:c1], axis=(1, 2)) for c0, c1 in bounds(w)], axis=1)
          for r0, r1 in bounds(h)]
  return jnp.stack(rows, axis=1)  # -> [B, g, g, C]


class SmallVGG(nn.Module):
  """A small VGG-style CNN for 64x64 (up to 128x128) images, fast on CPU.

  A space-to-depth input layer (factor 2: 64x64x3 -> 32x32x12, a cheap way to
  halve the resolution without losing pixels), then one block per entry of
  `widths`: `convs_per_block` times (3x3 conv, BatchNorm, ReLU), then a 2x2 max
  pool. With the defaults a 64x64 image gives a [4, 4, 256] map.

  Input: [B, h, w, 3] float32 (in [0, 1] or normalized); h and w divisible by
  2 ** (len(widths) + 1).
  """
  widths: Sequence[int] = (64, 128, 256)
  convs_per_block: int = 2
  s2d_factor: int = 2  # space-to-depth factor of the input layer
  pool: str = "maxmean"  # "maxmean" [B, 2C], "grid" [B, g*g*C], "flatten"
  grid: int = 2  # g, for pool="grid"
  grid_reduce: str = "max"  # how a grid cell is pooled: "max" or "mean"
  pool_last: bool = True  # False keeps the last block's resolution (no pool)
  cell_fc: int = 0  # pool="grid": a per-cell Dense + ReLU of this width (0 = none)
  bn_momentum: float = 0.9
  dtype: Optional[Any] = None  # compute dtype (None: the parameters' float32)

  def setup(self):
    for block, width in enumerate(self.widths, start=1):
      for i in range(1, self.convs_per_block + 1):
        setattr(self, f"block{block}_conv{i}",
                nn.Conv(width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype))
        setattr(self, f"block{block}_bn{i}",
                nn.BatchNorm(momentum=self.bn_momentum, dtype=self.dtype))
    if self.cell_fc:
      self.cell_fc_dense = nn.Dense(self.cell_fc, dtype=self.dtype)

  def features(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, h, w, 3] -> feature map [B, h', w', C] (C = widths[-1])."""
    x = space_to_depth(x, self.s2d_factor)  # -> [B, h/2, w/2, 12]
    for block in range(1, len(self.widths) + 1):
      for i in range(1, self.convs_per_block + 1):
        x = getattr(self, f"block{block}_conv{i}")(x)
        x = getattr(self, f"block{block}_bn{i}")(x, use_running_average=not train)
        x = nn.relu(x)
      if self.pool_last or block < len(self.widths):
        x = _max_pool(x)  # -> [B, h/2, w/2, width]
    return x

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[B, h, w, 3] -> pooled features [B, D] (D depends on `pool`)."""
    x = self.features(x, train)  # -> [B, h', w', C]
    b, h, w, c = x.shape
    if self.pool == "maxmean":
      return jnp.concatenate([x.max(axis=(1, 2)), x.mean(axis=(1, 2))],
                             axis=-1)  # -> [B, 2C]
    if self.pool == "grid":
      x = adaptive_pool(x, self.grid, self.grid_reduce)  # -> [B, g, g, C]
      if self.cell_fc:  # VGG's fc layers, one per cell (a 1x1 convolution)
        x = nn.relu(self.cell_fc_dense(x))  # -> [B, g, g, F]
      return x.reshape(b, -1)  # -> [B, g*g*C] (or [B, g*g*F])
    if self.pool == "flatten":
      return x.reshape(b, h * w * c)  # -> [B, h'*w'*C]
    raise ValueError(f"pool must be one of {SMALL_VGG_POOLS}, "
                     f"got {self.pool!r}")
