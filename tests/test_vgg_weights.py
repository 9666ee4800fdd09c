"""Pretrained VGG16 import: parity with Keras's own VGG16 and with an
independent NCHW computation of torchvision's, and the input normalizations.

The Keras model is built once per module (about 10 s for the 138M random
weights, 0.5 GB written as HDF5); every forward pass is one or two 224x224
images.
"""

import json
import os
import struct

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from captionjax import cli
from captionjax import weights
from captionjax.models.vgg import VGG16, VGG16_BLOCKS

# Compared with references: full float32 matmuls on any backend (conftest).
pytestmark = pytest.mark.usefixtures("highest_matmul_precision")

SIZE = 224


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def smooth_images(n, size=SIZE, seed=0):
  """RGB in [0, 1], multiples of 1/255 (so uint8 files hold them exactly):
  smooth random fields (more image-like than white noise)."""
  rng = np.random.default_rng(seed)
  coarse = rng.random((n, 7, 7, 3))
  x = np.kron(coarse, np.ones((1, size // 7 + 1, size // 7 + 1, 1)))[:, :size, :size]
  x = 0.7 * x + 0.3 * rng.random((n, size, size, 3))
  return (np.round(x * 255.0) / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def keras_vgg16(tmp_path_factory):
  """(h5 path, images [2, 224, 224, 3] in [0, 1], Keras fc2 [2, 4096], Keras softmax [2, 1000])."""
  keras = pytest.importorskip("keras")
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  model = keras.applications.VGG16(weights=None)
  rng = np.random.default_rng(1)
  for layer in model.layers:  # Keras zeroes biases: randomize them to test them too
    if getattr(layer, "bias", None) is not None:
      layer.bias.assign(0.05 * rng.standard_normal(layer.bias.shape).astype(np.float32))
  path = str(tmp_path_factory.mktemp("keras") / "vgg16_random.h5")
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  x = smooth_images(2)
  both = keras.Model(model.input, [model.get_layer("fc2").output, model.output])
  keras_in = keras.applications.vgg16.preprocess_input(x.copy() * 255.0)
  fc2, probs = (np.asarray(a) for a in both(keras_in))
  return path, x, fc2, probs


def test_keras_file_is_the_legacy_layout(keras_vgg16):
  path = keras_vgg16[0]
  with h5py.File(path, "r") as f:
    names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
    assert "block1_conv1" in names and "fc2" in names
    assert len(f["block5_conv3"].attrs["weight_names"]) == 2


@pytest.fixture(scope="module")
def imported(keras_vgg16, tmp_path_factory):
  """The Keras file imported by the command line: the output directory."""
  out = str(tmp_path_factory.mktemp("imported"))
  assert cli.main(["import-weights", f"--keras_h5={keras_vgg16[0]}", f"--output={out}"]) == 0
  return out


def test_keras_parity_at_fc2_and_logits(keras_vgg16, imported):
  path, x, want_fc2, want_probs = keras_vgg16
  params, meta = weights.load(imported)
  assert meta["preprocess"] == "caffe" and meta["fc1_input"] == [7, 7, 512]
  with h5py.File(path, "r") as f:  # stored as Keras wrote it
    np.testing.assert_array_equal(params["block3_conv2"]["kernel"],
                                  f["block3_conv2"]["block3_conv2/kernel"][()])
  del params

  model = VGG16(output="logits", **weights.model_kwargs(imported))
  like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  variables = {"params": weights.load_params(imported, like)}
  fc2, logits = jax.jit(lambda v, x: model.apply(v, x, method=_fc7_and_logits))(variables, x)
  assert np.abs(want_fc2).max() > 0 and (want_fc2 > 0).mean() > 0.1  # not all dead
  err = relative_error(fc2, want_fc2)
  print(f"Keras VGG16 parity at fc2: relative error {err:.3g}")
  assert err < 1e-4
  assert relative_error(jax.nn.softmax(logits), want_probs) < 1e-4


def _fc7_and_logits(m, x):
  """fc2's output (after its ReLU) and the logits of a VGG16(output="logits")."""
  from captionjax.models.vgg import normalize_input  # pylint: disable=g-import-not-at-top
  x = m.conv_features(normalize_input(x, m.preprocess))
  x = jax.nn.relu(m.fc1(x.reshape(x.shape[0], -1)))
  x = jax.nn.relu(m.fc2(x))
  return x, m.predictions(x)


def test_fc7_model_drops_predictions_and_notop_is_refused(imported, tmp_path):
  model = VGG16(output="fc7")
  like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  params = weights.load_params(imported, like)
  assert set(params) == set(like)  # predictions left out
  # fc1 fixes the input size: a 64 px model cannot take 224 px weights.
  like64 = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  with pytest.raises(weights.WeightsError, match="fc1/kernel.*224 px"):
    weights.load_params(imported, like64)
  notop = {k: v for k, v in params.items() if k.startswith("block")}
  out = str(tmp_path / "notop")
  weights.save(notop, out, source="x_notop.h5", source_format="keras_h5")
  with pytest.raises(weights.WeightsError, match="no layer fc1"):
    weights.load_params(out, like)
  conv5 = VGG16(output="conv5")
  like5 = jax.eval_shape(conv5.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  assert set(weights.load_params(out, like5)) == set(notop)


# ---------------------------------------------------------------- torchvision


def torch_state_dict(seed=0, classes=1000):
  """A random torchvision-vgg16-shaped state dict (NCHW / [out, in] layout)."""
  rng = np.random.default_rng(seed)
  state, c_in, i = {}, 3, 0
  for widths in VGG16_BLOCKS:
    for width in widths:
      std = np.sqrt(2.0 / (9 * c_in))
      state[f"features.{i}.weight"] = (std * rng.standard_normal((width, c_in, 3, 3))).astype(np.float32)
      state[f"features.{i}.bias"] = (0.05 * rng.standard_normal(width)).astype(np.float32)
      c_in, i = width, i + 2
    i += 1
  for idx, (n_out, n_in) in {0: (4096, 512 * 7 * 7), 3: (4096, 4096), 6: (classes, 4096)}.items():
    w = rng.standard_normal((n_out, n_in), dtype=np.float32)
    w *= np.float32(np.sqrt(2.0 / n_in))
    state[f"classifier.{idx}.weight"] = w
    state[f"classifier.{idx}.bias"] = (0.05 * rng.standard_normal(n_out)).astype(np.float32)
  return state


def write_safetensors(path, tensors):
  """The safetensors format, written by hand (independent of the reader): float32."""
  write_safetensors_raw(path, {name: ("F32", a.shape, np.ascontiguousarray(a, np.float32).tobytes())
                               for name, a in tensors.items()})


def write_safetensors_raw(path, tensors):
  """{name: (safetensors dtype, shape, little-endian bytes)} -> a .safetensors file."""
  header, offset, blobs = {}, 0, []
  for name, (dtype, shape, blob) in tensors.items():
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head)
    for blob in blobs:
      f.write(blob)


def torch_reference(state, x_nchw):
  """torchvision's vgg16 forward in NCHW, with torch's normalization: -> (fc7, logits)."""
  mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
  std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
  x = jnp.asarray((x_nchw - mean) / std)
  i = 0
  for widths in VGG16_BLOCKS:
    for _ in widths:
      w, b = state[f"features.{i}.weight"], state[f"features.{i}.bias"]
      x = jax.lax.conv_general_dilated(x, jnp.asarray(w), (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NCHW", "OIHW", "NCHW"))
      x = jax.nn.relu(x + b[None, :, None, None])
      i += 2
    n, c, h, w_ = x.shape
    x = x.reshape(n, c, h // 2, 2, w_ // 2, 2).max(axis=(3, 5))  # 2x2 max pool
    i += 1
  x = x.reshape(x.shape[0], -1)  # torch.flatten: (C, h, w) order
  lin = lambda x, k: x @ state[f"classifier.{k}.weight"].T + state[f"classifier.{k}.bias"]
  fc7 = jax.nn.relu(lin(jax.nn.relu(lin(x, 0)), 3))
  return np.asarray(fc7), np.asarray(lin(fc7, 6))


def test_torchvision_conversion_matches_nchw_reference(tmp_path):
  state = torch_state_dict()
  path = str(tmp_path / "vgg16.safetensors")
  write_safetensors(path, {f"module.{k}": v for k, v in state.items()})  # DataParallel prefix too
  out = str(tmp_path / "w")
  assert cli.main(["import-weights", f"--torch_state_dict={path}", f"--output={out}"]) == 0
  assert weights.load_meta(out)["preprocess"] == "torch"
  x = smooth_images(1, seed=3)  # NHWC RGB in [0, 1]
  want_fc7, want_logits = torch_reference(state, x.transpose(0, 3, 1, 2))
  model = VGG16(output="logits", **weights.model_kwargs(out))
  like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  variables = {"params": weights.load_params(out, like)}
  logits = jax.jit(model.apply)(variables, x)
  assert want_fc7.max() > 0
  err = relative_error(logits, want_logits)
  print(f"torchvision conversion: relative error of the logits {err:.3g}")
  assert err < 1e-4
  # fc6's rows, element by element: ours (h, w, C), torch's (C, h, w).
  fc1, w6 = variables["params"]["fc1"]["kernel"], state["classifier.0.weight"]
  rng = np.random.default_rng(0)
  for h, w, c, o in zip(*(rng.integers(0, n, 50) for n in (7, 7, 512, 4096))):
    assert fc1[(h * 7 + w) * 512 + c, o] == w6[o, c * 49 + h * 7 + w]
  assert not np.array_equal(fc1, w6.T)  # the reorder is not the identity


def test_torch_errors_are_clear(tmp_path):
  state = {k: v for k, v in torch_state_dict(classes=2).items() if not k.startswith("classifier")}
  bn = dict(state, **{"features.1.running_mean": np.zeros(64, np.float32)})
  with pytest.raises(weights.WeightsError, match="vgg16_bn"):
    weights.convert_torch_vgg16(bn, "bn.pth")
  with pytest.raises(weights.WeightsError, match=r"features\.0\.weight"):
    weights.convert_torch_vgg16({k: v for k, v in state.items() if k != "features.0.weight"}, "x")
  # A truncated safetensors file names the file.
  path = str(tmp_path / "t.safetensors")
  write_safetensors(path, {"features.0.weight": state["features.0.weight"]})
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(weights.WeightsError, match="t.safetensors.*truncated"):
    weights.read_safetensors(path)
  # .pth without torch, or a missing file: one line, exit status 2 (bad input).
  assert cli.main(["import-weights", f"--torch_state_dict={tmp_path}/none.pth",
                   f"--output={tmp_path}/o"]) == 2


def test_safetensors_half_floats_become_float32(tmp_path):
  a = (np.arange(-12, 12, dtype=np.float32) / 4).reshape(4, 6)  # exact in 8 mantissa bits
  bf16 = (a.view(np.uint32) >> 16).astype("<u2")  # bfloat16: float32's top half
  path = str(tmp_path / "half.safetensors")
  write_safetensors_raw(path, {"bf": ("BF16", a.shape, bf16.tobytes()),
                               "h": ("F16", a.shape, a.astype("<f2").tobytes()),
                               "f": ("F32", a.shape, a.astype("<f4").tobytes()),
                               "i": ("I64", (3,), np.array([1, -2, 3], "<i8").tobytes())})
  got = weights.read_safetensors(path)
  for name in ("bf", "h", "f"):
    assert got[name].dtype == np.float32
    np.testing.assert_array_equal(got[name], a)
  assert got["i"].dtype == np.int64 and got["i"].tolist() == [1, -2, 3]


@pytest.mark.parametrize("content,message", [
    (b"", "not a safetensors file"),
    (b"not a safetensors file at all, just text", "not a safetensors file"),
    (struct.pack("<Q", 8) + b"{notjson", "not a safetensors file.*JSON"),
])
def test_bad_safetensors_files_are_one_clear_line(tmp_path, capsys, content, message):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(content)
  with pytest.raises(weights.WeightsError, match=f"bad.safetensors: {message}"):
    weights.read_safetensors(str(path))
  assert cli.main(["import-weights", f"--torch_state_dict={path}",
                   f"--output={tmp_path}/o"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "bad.safetensors" in err[0]


def test_safetensors_float8_is_float32_or_named(tmp_path):
  """float8 has no numpy type: the safetensors package (0.8) cannot give it,
  and the error names the file; should it ever give it, it is float32."""
  path = str(tmp_path / "f8.safetensors")
  write_safetensors_raw(path, {"x": ("F8_E4M3", (2,), b"\x01\x08")})
  try:
    got = weights.read_safetensors(path)
  except weights.WeightsError as e:
    assert str(e).startswith(f"{path}: a tensor's dtype cannot be read as numpy")
  else:  # E4M3: 0x01 is the smallest subnormal, 2^-9; 0x08 the smallest normal, 2^-6
    assert got["x"].dtype == np.float32 and got["x"].tolist() == [2.0 ** -9, 2.0 ** -6]


def test_keras_errors_are_clear(tmp_path):
  path = str(tmp_path / "other.h5")
  with h5py.File(path, "w") as f:
    f.create_dataset("x", data=np.zeros(3))
  with pytest.raises(weights.WeightsError, match="other.h5.*layer_names"):
    weights.read_keras_h5(path)
  bad = str(tmp_path / "bad.h5")
  with open(bad, "wb") as f:
    f.write(b"not hdf5")
  with pytest.raises(weights.WeightsError, match="bad.h5.*not an HDF5"):
    weights.read_keras_h5(bad)
  with pytest.raises(weights.WeightsError, match="weights.json"):
    weights.load_meta(str(tmp_path))


# ---------------------------------------------------------------- normalization


def test_model_applies_the_recorded_normalization():
  x = smooth_images(1, size=8)
  caffe = np.asarray(VGG16(preprocess="caffe").apply({}, x, method=lambda m, x: _norm(m, x)))
  want = x[..., ::-1] * 255.0 - np.array([103.939, 116.779, 123.68], np.float32)
  np.testing.assert_allclose(caffe, want, rtol=1e-6, atol=1e-4)
  torch = np.asarray(VGG16(preprocess="torch").apply({}, x, method=lambda m, x: _norm(m, x)))
  want = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(torch, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="preprocess"):
    VGG16(preprocess="bgr").apply({}, x, method=lambda m, x: _norm(m, x))


def _norm(m, x):
  from captionjax.models.vgg import normalize_input  # pylint: disable=g-import-not-at-top
  return normalize_input(x, m.preprocess)


# ---------------------------------------------------------------- features


def test_features_command_matches_keras_fc2(keras_vgg16, imported, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from captionjax import features  # pylint: disable=g-import-not-at-top
  from captionjax.images import load_image  # pylint: disable=g-import-not-at-top
  _, x, want_fc2, _ = keras_vgg16
  folder = tmp_path / "images"
  folder.mkdir()
  u8 = np.round(x * 255.0).astype(np.uint8)
  Image.fromarray(u8[1]).save(folder / "b.png")  # 224x224: used as it is
  Image.fromarray(u8[0]).save(folder / "a.png")
  Image.fromarray(u8[0][:200, :150]).save(folder / "c_small.jpg")  # resized to 224
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  (folder / ".hidden.png").write_bytes(b"")
  out = str(tmp_path / "out" / "feats.npy")
  assert cli.main(["features", f"--weights={imported}", f"--images={folder}",
                   f"--output={out}", "--batch_size=2"]) == 0
  feats = np.load(out)
  with open(features.names_path(out), encoding="utf-8") as f:
    names = json.load(f)
  assert names == ["a.png", "b.png", "c_small.jpg"]  # sorted; broken and hidden left out
  assert feats.shape == (3, 4096) and feats.dtype == np.float32
  err = relative_error(feats[:2], want_fc2)
  print(f"features command vs Keras fc2: relative error {err:.3g}")
  assert err < 1e-4
  # The resized image: fc7 of the 224x224 bicubic resize, by the extractor itself.
  small = load_image(str(folder / "c_small.jpg"), size=224)
  extractor = features.make_extractor(imported, 2)
  np.testing.assert_allclose(feats[2], extractor(np.stack([small, u8[1]]))[0],
                             rtol=1e-5, atol=1e-5 * np.abs(feats).max())
  assert cli.main(["features", f"--weights={imported}", f"--images={tmp_path}/none",
                   f"--output={out}"]) == 2
