"""Awkward but valid images decode right, broken ones fail with a clear reason,
and a folder of both goes through `captionjax prepro` with every valid image
kept, every broken one named and exit status 0.

Every kind is generated here with PIL (or by hand where PIL cannot write it),
and checked against the pixels it was made from.
"""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from captionjax import cli
from captionjax import images
from captionjax import input_pipeline
from captionjax import records

H, W = 40, 56  # the generated images' size (not square: orientation shows)


def _content(seed=0, h=H, w=W):
  """Smooth RGB content (JPEG-friendly), uint8 [h, w, 3]."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _save(im, fmt, **kw):
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def _png_chunk(kind, data):
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _png16_rgb(a16):
  """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
  h, w, _ = a16.shape
  raw = b"".join(b"\0" + a16[y].astype(">u2").tobytes() for y in range(h))
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
          + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _png_claiming_size(w, h):
  """A small valid PNG whose header claims w x h pixels (a decompression bomb)."""
  raw = b"\0" + b"\0" * 3  # one 1x1 row; the decoder never gets that far
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _with_exif(a, orientation):
  im = Image.fromarray(a)
  exif = im.getexif()
  exif[0x0112] = orientation
  return _save(im, "JPEG", quality=95, exif=exif.tobytes())


def valid_kinds():
  """name -> (file name, file bytes, expected RGB [h, w, 3], max mean abs error)."""
  a = _content(0)
  gray = a.mean(-1).astype(np.uint8)
  kinds = {}
  kinds["rgb"] = ("rgb.jpg", _save(Image.fromarray(a), "JPEG", quality=95), a, 3)
  kinds["progressive"] = ("progressive.jpg", _save(Image.fromarray(a), "JPEG", quality=95,
                                                   progressive=True), a, 3)
  # RGB -> CMYK with K = 0 is exactly invertible: the JPEG's only loss is its own.
  kinds["cmyk"] = ("cmyk.jpg", _save(Image.fromarray(a).convert("CMYK"), "JPEG", quality=95), a, 3)
  kinds["grayscale"] = ("gray.png", _save(Image.fromarray(gray), "PNG"),
                        np.repeat(gray[..., None], 3, -1), 0)
  kinds["grayscale_jpeg"] = ("gray.jpg", _save(Image.fromarray(gray), "JPEG", quality=95),
                             np.repeat(gray[..., None], 3, -1), 3)
  # Palette: indices into a known palette.
  pal = np.array([[255, 0, 0], [0, 128, 0], [20, 40, 250], [240, 240, 10]], np.uint8)
  idx = (np.arange(H)[:, None] // 10 + np.arange(W)[None, :] // 14) % 4
  p = Image.fromarray(idx.astype(np.uint8), "P")
  p.putpalette(pal.flatten().tolist())
  kinds["palette"] = ("palette.png", _save(p, "PNG"), pal[idx], 0)
  kinds["palette_gif"] = ("palette.gif", _save(p, "GIF"), pal[idx], 0)
  # Palette with a transparent index: composited on white.
  kinds["palette_transparent"] = ("palette_t.png", _save(p, "PNG", transparency=2),
                                  np.where((idx == 2)[..., None], 255, pal[idx]).astype(np.uint8), 0)
  # RGBA: composited on white, alpha varying across the image.
  alpha = np.linspace(0, 255, W).round().astype(np.uint8)[None, :].repeat(H, 0)
  rgba = np.dstack([a, alpha])
  al = alpha[..., None] / 255.0
  kinds["rgba"] = ("rgba.png", _save(Image.fromarray(rgba, "RGBA"), "PNG"),
                   (a * al + 255 * (1 - al)).round().astype(np.uint8), 0.6)
  kinds["gray_alpha"] = ("la.png", _save(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG"),
                         np.repeat((gray[..., None] * al + 255 * (1 - al)).round(), 3, -1)
                         .astype(np.uint8), 0.6)
  # 16 bits per sample: gray via PIL, RGB written by hand.
  g16 = (gray.astype(np.uint32) * 257 + 100).clip(0, 65535).astype(np.uint16)
  kinds["gray16"] = ("gray16.png", _save(Image.fromarray(g16), "PNG"),
                     np.repeat((g16 / 65535 * 255).round().astype(np.uint8)[..., None], 3, -1), 0.6)
  rgb16 = a.astype(np.uint16) * 257
  kinds["rgb16"] = ("rgb16.png", _png16_rgb(rgb16), a, 0.6)
  kinds["float_tiff"] = ("float.tif", _save(Image.fromarray((gray / 255).astype(np.float32), "F"),
                                            "TIFF"), np.repeat(gray[..., None], 3, -1), 0.6)
  # Any format behind any name.
  kinds["png_named_jpg"] = ("actually_png.jpg", _save(Image.fromarray(a), "PNG"), a, 0)
  kinds["jpeg_named_png"] = ("actually_jpeg.png", _save(Image.fromarray(a), "JPEG", quality=95),
                             a, 3)
  kinds["bmp"] = ("image.bmp", _save(Image.fromarray(a), "BMP"), a, 0)
  kinds["webp_lossless"] = ("image.webp", _save(Image.fromarray(a), "WEBP", lossless=True), a, 0)
  kinds["tiff"] = ("image.tiff", _save(Image.fromarray(a), "TIFF"), a, 0)
  # EXIF orientation: stored sideways, shown upright.
  kinds["exif_rotate_90cw"] = ("exif6.jpg", _with_exif(a, 6), np.rot90(a, -1), 3)
  kinds["exif_rotate_180"] = ("exif3.jpg", _with_exif(a, 3), np.rot90(a, 2), 3)
  kinds["exif_rotate_90ccw"] = ("exif8.jpg", _with_exif(a, 8), np.rot90(a, 1), 3)
  kinds["exif_mirror"] = ("exif2.jpg", _with_exif(a, 2), a[:, ::-1], 3)
  kinds["unicode_name"] = ("café_猫.jpg", _save(Image.fromarray(a), "JPEG", quality=95), a, 3)
  return kinds


def broken_kinds():
  """name -> (file name, file bytes or None for a missing file, reason substring)."""
  a = _content(1)
  jpg = _save(Image.fromarray(a), "JPEG", quality=95)
  prog = _save(Image.fromarray(a), "JPEG", quality=95, progressive=True)
  png = _save(Image.fromarray(a), "PNG")
  return {
      "truncated_jpeg": ("truncated.jpg", jpg[:len(jpg) // 2], "truncated"),
      "truncated_progressive": ("truncated_prog.jpg", prog[:len(prog) // 2], "truncated"),
      "truncated_png": ("truncated.png", png[:len(png) // 2], "truncated"),
      "header_only_jpeg": ("header_only.jpg", jpg[:200], "truncated"),
      "empty": ("empty.jpg", b"", "empty file"),
      "text": ("notes.jpg", b"this is not an image\n", "not an image"),
      "html_error_page": ("download.jpg", b"<html><body>404 Not Found</body></html>",
                          "not an image"),
      "random_bytes": ("noise.png", np.random.default_rng(0).bytes(3000), "not an image"),
      "bomb": ("bomb.png", _png_claiming_size(20000, 20000),
               "image too large: 20000x20000 exceeds the limit of 268435456 pixels"),
      "missing": ("missing.jpg", None, "file not found"),
  }


def _write(root, name, data):
  path = os.path.join(root, name)
  if data is not None:
    with open(path, "wb") as f:
      f.write(data)
  return path


@pytest.mark.parametrize("kind", sorted(valid_kinds()))
@pytest.mark.parametrize("as_bytes", [False, True])
def test_valid_kinds_decode_right(tmp_path, kind, as_bytes):
  name, data, want, tol = valid_kinds()[kind]
  src = data if as_bytes else _write(str(tmp_path), name, data)
  got = images.load_image(src)
  assert got.dtype == np.uint8 and got.shape == want.shape
  err = np.abs(got.astype(np.float32) - want).mean()
  assert err <= tol, (kind, err)


@pytest.mark.parametrize("kind", sorted(valid_kinds()))
def test_valid_kinds_resize_like_pil(kind):
  """Resized output matches PIL's bicubic resize of the expected pixels."""
  _, data, want, tol = valid_kinds()[kind]
  got = images.load_image(data, 24)
  ref = np.asarray(Image.fromarray(want).resize((24, 24), Image.BICUBIC), np.float32)
  assert got.shape == (24, 24, 3)
  assert np.abs(got - ref).mean() <= tol + 1.0, kind


@pytest.mark.parametrize("kind", sorted(broken_kinds()))
def test_broken_kinds_fail_with_a_reason(tmp_path, kind):
  name, data, reason = broken_kinds()[kind]
  path = _write(str(tmp_path), name, data)
  for size in (None, 32):
    with pytest.raises(images.ImageError, match=reason) as e:
      images.load_image(path, size)
    assert "\n" not in str(e.value)


def test_directory_and_unreadable_are_named(tmp_path):
  (tmp_path / "folder.jpg").mkdir()
  with pytest.raises(images.ImageError, match="is a directory"):
    images.load_image(str(tmp_path / "folder.jpg"))


def test_pixel_limit_is_a_parameter():
  data = _save(Image.fromarray(_content(0)), "PNG")
  with pytest.raises(images.ImageError, match=f"{W}x{H} exceeds the limit of 1000 pixels"):
    images.load_image(data, max_pixels=1000)
  assert images.load_image(data, max_pixels=W * H).shape == (H, W, 3)


def test_large_jpeg_decodes_at_reduced_scale_correctly():
  """A 4000 x 3000 photo: decoded with JPEG draft scaling, close to a full decode."""
  a = _content(2, 3000, 4000)
  data = _save(Image.fromarray(a), "JPEG", quality=90)
  got = images.load_image(data, 64).astype(np.float32)
  ref = np.asarray(Image.fromarray(a).resize((64, 64), Image.BICUBIC), np.float32)
  assert np.abs(got - ref).mean() < 2.0


def test_folder_of_awkward_and_broken_images(tmp_path, capsys):
  """The acceptance check: every valid image kept, every broken one named, exit 0."""
  root = tmp_path / "photos"
  root.mkdir()
  valid, broken = valid_kinds(), broken_kinds()
  rows = ["image,caption"]
  for kind, (name, data, _, _) in valid.items():
    _write(str(root), name, data)
    rows += [f"{name},a photo of kind {kind.replace('_', ' ')}", f"{name},an image here"]
  for kind, (name, data, _) in broken.items():
    _write(str(root), name, data)
    rows += [f"{name},a broken file {kind.replace('_', ' ')}"]
  csv = tmp_path / "captions.csv"
  csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
  out = str(tmp_path / "out")
  status = cli.main(["prepro", f"--captions_csv={csv}", f"--images_root={root}",
                     f"--output_dir={out}", "--num_val=2", "--num_test=2",
                     "--word_count_threshold=0", "--image_size=32", "--num_workers=2",
                     "--no_progress"])
  assert status == 0
  err = capsys.readouterr().err
  info = records.load_info(out)
  assert info["num_images"] == len(valid)
  assert f"skipped {len(broken)}" in err
  skipped = {s["file"]: s["reason"] for s in info["skipped"]}
  assert set(skipped) == {name for name, _, _ in broken.values()}
  for name, _, reason in broken.values():
    assert reason in skipped[name]
    assert f"skipped {name}: {skipped[name]}" in err
  kept = set()
  for split in info["splits"]:
    kept |= set(input_pipeline.load_split(out, split).file_name)
  assert kept == {name for name, _, _, _ in valid.values()}
  # Captions of broken images never reach the vocabulary.
  assert "broken" not in open(os.path.join(out, "vocab.json"), encoding="utf-8").read()
