"""`captionjax import-weights`: pretrained VGG16 weights -> captionjax's layout.

    captionjax import-weights --keras_h5=vgg16_weights_tf_dim_ordering_tf_kernels.h5 --output=weights/vgg16
    captionjax import-weights --torch_state_dict=vgg16.safetensors --output=weights/vgg16_torch

Sources:
  --keras_h5: Keras's legacy HDF5 weights (root attribute `layer_names`, per
    layer group the attribute `weight_names`): the public
    `vgg16_weights_tf_dim_ordering_tf_kernels[_notop].h5`, files written by
    `model.save_weights("x.h5")` in Keras 2 or by Keras 3's legacy h5 saver,
    and whole-model files (weights under `model_weights`). Kernels are
    channels-last already; the input is Caffe's (BGR, 0..255, mean-subtracted).
  --torch_state_dict: torchvision's `vgg16` state dict (`features.0.weight`
    ... `classifier.6.bias`), as `.safetensors` (read without torch, by the
    `safetensors` package; float16 and bfloat16 become float32) or
    `.pth`/`.pt` (needs torch). Convolution kernels go from [O, I, kh, kw]
    to [kh, kw, I, O]; fc6's input is reordered from torch's (C, h, w)
    flatten to our (h, w, C); the input is torchvision's (RGB in [0, 1],
    minus mean, over std).

The output directory:
  params.npz    float32 arrays named "LAYER/kernel" and "LAYER/bias" with
                Keras's layer names ("block1_conv1" .. "block5_conv3", "fc1",
                "fc2", "predictions"): the Flax parameters of
                captionjax.models.VGG16. fc1, fc2 and predictions are absent
                in "notop" files.
  weights.json  {"model": "vgg16", "preprocess": "caffe" | "torch",
                 "source": path, "source_format": "keras_h5" | "torch",
                 "layers": [...], "fc1_input": [h, w, C] or null}
The model applies `preprocess` itself (VGG16.preprocess): callers feed RGB in
[0, 1]. `captionjax train --config.model.cnn_weights=DIR` and
`captionjax features --weights=DIR` read this directory.
"""

import json
import os
import sys

import ml_dtypes
import numpy as np

from captionjax.models.vgg import VGG16_BLOCKS, VGG16_FC_SIZE, VGG16_PREPROCESS

PARAMS_FILE = "params.npz"
META_FILE = "weights.json"
CONV_LAYERS = tuple(f"block{b}_conv{i}" for b, widths in enumerate(VGG16_BLOCKS, start=1)
                    for i in range(1, len(widths) + 1))
FC_LAYERS = ("fc1", "fc2", "predictions")
# The preprocessing each source's VGG16 was trained with.
SOURCE_PREPROCESS = {"keras_h5": "caffe", "torch": "torch"}


class WeightsError(ValueError):
  """A weight file or directory that cannot be used; str(e) names it."""


def add_arguments(p):
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--keras_h5", help="Keras HDF5 weights (legacy layout, e.g. "
                   "vgg16_weights_tf_dim_ordering_tf_kernels.h5)")
  src.add_argument("--torch_state_dict",
                   help="torchvision vgg16 state dict: .safetensors, or .pth with torch installed")
  p.add_argument("--output", required=True, help="directory to write params.npz and weights.json")
  p.add_argument("--preprocess", choices=VGG16_PREPROCESS, default=None,
                 help="override the input normalization recorded for the weights "
                 "(default: caffe for Keras files, torch for torchvision)")


def run(args) -> int:
  try:
    if args.keras_h5:
      params, fmt, path = read_keras_h5(args.keras_h5), "keras_h5", args.keras_h5
    else:
      params = convert_torch_vgg16(read_state_dict(args.torch_state_dict), args.torch_state_dict)
      fmt, path = "torch", args.torch_state_dict
    meta = save(params, args.output, source=path, source_format=fmt, preprocess=args.preprocess)
  except (WeightsError, OSError) as e:
    print(f"captionjax import-weights: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"output": args.output, "preprocess": meta["preprocess"],
                    "layers": len(meta["layers"]), "fc1_input": meta["fc1_input"]}))
  return 0


# ---------------------------------------------------------------- Keras HDF5


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_keras_h5(path: str) -> dict:
  """Keras legacy HDF5 weights -> {layer: {"kernel", "bias"}} float32 numpy."""
  import h5py  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise WeightsError(f"--keras_h5={path}: no such file")
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise WeightsError(f"{path}: not an HDF5 file ({str(e).splitlines()[0]})") from None
  with f:
    root = f
    if "layer_names" not in f.attrs and "model_weights" in f:
      root = f["model_weights"]  # a whole model saved with model.save("x.h5")
    if "layer_names" not in root.attrs:
      raise WeightsError(f"{path}: not Keras's legacy HDF5 weight layout (no 'layer_names' "
                         "attribute; Keras 3 '.weights.h5' files: load them in Keras and "
                         "re-save with the legacy h5 saver)")
    params = {}
    for name in (_text(n) for n in root.attrs["layer_names"]):
      if name not in CONV_LAYERS + FC_LAYERS:
        continue
      group = root[name]
      arrays = [np.asarray(group[_text(w)], np.float32)
                for w in group.attrs.get("weight_names", [])]
      kernels = [a for a in arrays if a.ndim > 1]
      biases = [a for a in arrays if a.ndim == 1]
      if len(kernels) != 1 or len(biases) != 1:
        raise WeightsError(f"{path}: layer {name}: expected a kernel and a bias, got shapes "
                           f"{[a.shape for a in arrays]}")
      params[name] = {"kernel": kernels[0], "bias": biases[0]}
  if not params:
    raise WeightsError(f"{path}: no VGG16 layers (expected Keras's names block1_conv1 .. "
                       "fc2, predictions)")
  check_vgg16(params, path)
  return params


# ---------------------------------------------------------------- torchvision


def read_safetensors(path: str) -> dict:
  """A .safetensors file -> {name: numpy array} (float arrays as float32).

  Read by the `safetensors` package's numpy API. bfloat16 tensors come
  through ml_dtypes (imported above; a JAX dependency), whose bfloat16 numpy
  type the package finds by name; float32 holds them exactly.
  """
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    tensors = load_file(path)
  except SafetensorError as e:
    reason = str(e).splitlines()[0].removeprefix("Error while deserializing header: ")
    raise WeightsError(f"{path}: not a safetensors file, or a truncated one ({reason})"
                       ) from None
  except (TypeError, AttributeError) as e:  # a dtype numpy has no type for (float8, ...)
    raise WeightsError(f"{path}: a tensor's dtype cannot be read as numpy ({e}); "
                       "store the weights as float32, float16 or bfloat16") from None
  return {k: a.astype(np.float32, copy=False) if _is_float(a.dtype) else a
          for k, a in tensors.items()}


def _is_float(dtype) -> bool:
  """numpy's real floats and ml_dtypes' (bfloat16, float8 ...)."""
  try:
    ml_dtypes.finfo(dtype)
    return np.dtype(dtype).kind != "c"
  except ValueError:
    return False


def read_state_dict(path: str) -> dict:
  """A torch state dict (.safetensors, or .pth/.pt with torch) -> {name: numpy}."""
  if not os.path.isfile(path):
    raise WeightsError(f"--torch_state_dict={path}: no such file")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightsError(f"{path}: reading .pth needs torch (pip install torch), or convert it "
                       "to .safetensors (safetensors.torch.save_file(torch.load(PATH), OUT))"
                       ) from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many kinds on bad files
    raise WeightsError(f"{path}: cannot read the state dict ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def torch_vgg16_names() -> dict:
  """torchvision's module indices -> Keras's layer names."""
  names, i = {}, 0
  for block, widths in enumerate(VGG16_BLOCKS, start=1):
    for j in range(1, len(widths) + 1):
      names[f"features.{i}"] = f"block{block}_conv{j}"
      i += 2  # Conv2d, ReLU
    i += 1  # MaxPool2d
  names.update({"classifier.0": "fc1", "classifier.3": "fc2", "classifier.6": "predictions"})
  return names


def convert_torch_vgg16(state: dict, path: str = "state dict") -> dict:
  """torchvision vgg16 state dict (numpy) -> {layer: {"kernel", "bias"}} in NHWC layout."""
  state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
  if any(k.endswith("running_mean") for k in state):
    raise WeightsError(f"{path}: a batch-norm VGG (vgg16_bn) is not supported: give vgg16's")
  params = {}
  for prefix, name in torch_vgg16_names().items():
    w, b = state.get(prefix + ".weight"), state.get(prefix + ".bias")
    if w is None or b is None:
      if name in CONV_LAYERS:
        raise WeightsError(f"{path}: missing {prefix}.weight/.bias ({name}): not a "
                           "torchvision vgg16 state dict")
      continue
    w, b = np.asarray(w, np.float32), np.asarray(b, np.float32)
    if name in CONV_LAYERS:
      if w.ndim != 4:
        raise WeightsError(f"{path}: {prefix}.weight: expected [O, I, 3, 3], got {w.shape}")
      kernel = w.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
    elif name == "fc1":
      # torch flattens the [C, h, w] map (C-major), we flatten [h, w, C].
      c = VGG16_BLOCKS[-1][-1]
      if w.ndim != 2 or w.shape[1] % c:
        raise WeightsError(f"{path}: {prefix}.weight: expected [4096, h*w*{c}], got {w.shape}")
      side = int(round(np.sqrt(w.shape[1] // c)))
      if side * side * c != w.shape[1]:
        raise WeightsError(f"{path}: {prefix}.weight: {w.shape[1]} inputs is not a square "
                           f"map of {c} channels")
      kernel = (w.reshape(w.shape[0], c, side, side)
                .transpose(2, 3, 1, 0).reshape(side * side * c, w.shape[0]))  # -> [h*w*C, 4096]
    else:
      kernel = w.T  # [out, in] -> [in, out]
    params[name] = {"kernel": np.ascontiguousarray(kernel), "bias": b}
  check_vgg16(params, path)
  return params


# ---------------------------------------------------------------- checks, I/O


def check_vgg16(params: dict, where: str) -> None:
  """Raises WeightsError unless `params` has VGG16's convolutions (and
  consistent fully connected layers, when present)."""
  c_in = 3
  for block, widths in enumerate(VGG16_BLOCKS, start=1):
    for i, width in enumerate(widths, start=1):
      name = f"block{block}_conv{i}"
      if name not in params:
        raise WeightsError(f"{where}: layer {name} missing: not a VGG16")
      _expect(params, name, (3, 3, c_in, width), where)
      c_in = width
  fcs = [n for n in FC_LAYERS if n in params]
  if fcs and fcs[:2] != ["fc1", "fc2"]:
    raise WeightsError(f"{where}: fully connected layers {fcs}: expected fc1 and fc2")
  if "fc1" in params:
    rows = params["fc1"]["kernel"].shape[0]
    if rows % c_in:
      raise WeightsError(f"{where}: layer fc1: kernel {params['fc1']['kernel'].shape} does not "
                         f"take a flattened map of {c_in} channels")
    _expect(params, "fc1", (rows, VGG16_FC_SIZE), where)
    _expect(params, "fc2", (VGG16_FC_SIZE, VGG16_FC_SIZE), where)
  if "predictions" in params:
    _expect(params, "predictions", (VGG16_FC_SIZE, params["predictions"]["bias"].shape[0]), where)


def _expect(params, name, kernel_shape, where):
  k, b = params[name]["kernel"].shape, params[name]["bias"].shape
  if tuple(k) != tuple(kernel_shape) or tuple(b) != tuple(kernel_shape[-1:]):
    raise WeightsError(f"{where}: layer {name}: kernel {tuple(k)} and bias {tuple(b)}, "
                       f"expected {tuple(kernel_shape)} and ({kernel_shape[-1]},)")


def save(params: dict, output_dir: str, source: str, source_format: str,
         preprocess: str | None = None) -> dict:
  """Writes params.npz and weights.json into `output_dir`; returns the metadata."""
  preprocess = preprocess or SOURCE_PREPROCESS[source_format]
  os.makedirs(output_dir, exist_ok=True)
  flat = {f"{layer}/{k}": v for layer, p in params.items() for k, v in p.items()}
  tmp = os.path.join(output_dir, PARAMS_FILE + ".tmp.npz")
  np.savez(tmp, **flat)
  os.replace(tmp, os.path.join(output_dir, PARAMS_FILE))
  fc1_input = None
  if "fc1" in params:
    c = VGG16_BLOCKS[-1][-1]
    side = int(round(np.sqrt(params["fc1"]["kernel"].shape[0] // c)))
    fc1_input = [side, side, c]
  meta = {"model": "vgg16", "preprocess": preprocess, "source": os.path.abspath(source),
          "source_format": source_format,
          "layers": [n for n in CONV_LAYERS + FC_LAYERS if n in params],
          "fc1_input": fc1_input}
  with open(os.path.join(output_dir, META_FILE), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  return meta


def load_meta(weights_dir: str) -> dict:
  path = os.path.join(weights_dir, META_FILE)
  if not os.path.isfile(path):
    raise WeightsError(f"{weights_dir}: no {META_FILE} (write it with "
                       f"`captionjax import-weights --output={weights_dir}`)")
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise WeightsError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(meta, dict) or meta.get("preprocess") not in VGG16_PREPROCESS:
    raise WeightsError(f"{path}: field 'preprocess' must be one of {VGG16_PREPROCESS}, "
                       f"got {meta.get('preprocess')!r}")
  return meta


def load(weights_dir: str) -> tuple[dict, dict]:
  """(params {layer: {"kernel", "bias"}} numpy, metadata) of an imported directory."""
  meta = load_meta(weights_dir)
  path = os.path.join(weights_dir, PARAMS_FILE)
  try:
    with np.load(path) as z:
      flat = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise WeightsError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
  params = {}
  for key, value in flat.items():
    layer, name = key.split("/")
    params.setdefault(layer, {})[name] = value
  check_vgg16(params, path)
  return params, meta


def model_kwargs(weights_dir: str) -> dict:
  """The VGG16 constructor arguments the imported weights need."""
  return {"preprocess": load_meta(weights_dir)["preprocess"]}


def load_params(weights_dir: str, like, preprocess: str | None = None) -> dict:
  """The imported weights in the structure of a VGG16 parameter tree `like`
  (arrays or shape structs): every layer of `like` must be in the
  directory with the same shapes; layers the model lacks (e.g. predictions
  for output="fc7") are left out. With `preprocess`, the model's input
  normalization must be the one the weights record."""
  meta = load_meta(weights_dir)
  if preprocess is not None and preprocess != meta["preprocess"]:
    raise WeightsError(f"{weights_dir}: the weights expect preprocess={meta['preprocess']!r}, "
                       f"the model has {preprocess!r} (config.model.cnn_kwargs.preprocess)")
  params, _ = load(weights_dir)
  out = {}
  for layer, leaves in like.items():
    if layer not in params:
      raise WeightsError(f"{weights_dir}: has no layer {layer} (imported: {sorted(params)}); "
                         "a 'notop' file only serves output='conv5'")
    out[layer] = {}
    for name, leaf in leaves.items():
      value = params[layer][name]
      if tuple(value.shape) != tuple(leaf.shape):
        hint = (f" (these fc1 weights take {_input_side(params)} px images)"
                if layer == "fc1" else "")
        raise WeightsError(f"{weights_dir}: layer {layer}/{name} is {tuple(value.shape)}, the "
                           f"model's {tuple(leaf.shape)}{hint}")
      out[layer][name] = value.astype(leaf.dtype)
  return out


def _input_side(params) -> str:
  if "fc1" not in params:
    return "any"
  side = int(round(np.sqrt(params["fc1"]["kernel"].shape[0] // VGG16_BLOCKS[-1][-1])))
  return str(side * 32)
