"""Robust image decoding: every valid image decodes right, every broken one
raises `ImageError` with a one-line reason.

Handles EXIF orientation, CMYK, grayscale, palette and RGBA (composited on
white), 16-bit and float images, a GIF's first frame, any format behind any
file extension, and refuses images above `MAX_PIXELS` (a deliberate
decompression-bomb limit) with a clear message.
"""

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Images with more pixels than this are refused: 16384 x 16384, 768 MiB as
# decoded RGB (a 12000 x 9000 photo, 108 M pixels, is well inside).
MAX_PIXELS = 16384 * 16384
_WHITE = (255, 255, 255)

# Truncated files must fail loudly, never decode half-grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None  # we apply our own limit with a clear message


class ImageError(ValueError):
  """An image that cannot be used; str(e) is a one-line reason.

  `kind` sorts the reasons (a server maps them to status codes): "empty",
  "too_large" (over the pixel limit), "not_an_image", "corrupt" (a damaged or
  truncated image), "unreadable" (the file cannot be opened).
  """

  def __init__(self, message: str, kind: str = "corrupt"):
    super().__init__(message)
    self.kind = kind


# File signatures, to tell a damaged image from a file that is no image.
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))


def _signature(head: bytes) -> str | None:
  if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
    return "WebP"
  return next((name for sig, name in _SIGNATURES if head.startswith(sig)), None)


def _to_rgb(im: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB."""
  if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    a = np.asarray(im, dtype=np.float64)
    top = float(a.max()) if a.size else 0.0
    if im.mode.startswith("I;16"):
      hi = 65535.0
    elif im.mode == "I":  # 8- or 16-bit data in 32-bit ints; else its own range
      hi = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    else:  # "F": [0, 1] floats, else its own range
      hi = 1.0 if top <= 1.0 else top
    a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if im.mode == "P" and "transparency" in im.info:
    im = im.convert("RGBA")
  if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    im = im.convert("RGBA")
    bg = Image.new("RGB", im.size, _WHITE)
    bg.paste(im, mask=im.getchannel("A"))
    return bg
  if im.mode != "RGB":
    return im.convert("RGB")
  return im


def load_image(source, size: int | tuple[int, int] | None = None,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Decodes an image file or bytes to uint8 RGB `[H, W, 3]`.

  As `load_pil`, as an array.
  """
  return np.asarray(load_pil(source, size, max_pixels), dtype=np.uint8)


def load_pil(source, size: int | tuple[int, int] | None = None,
             max_pixels: int = MAX_PIXELS) -> Image.Image:
  """Decodes an image file or bytes to an RGB PIL image.

  Args:
    source: a path or the file's bytes.
    size: if given, the output is resized (bicubic, aspect ratio not kept, as
      NeuralTalk2) to `size x size` or `(height, width)`.
    max_pixels: the decompression-bomb limit.

  Raises:
    ImageError: the file is missing, empty, truncated, not an image or too big.
  """
  head = b""
  try:
    if isinstance(source, (bytes, bytearray)):
      if not source:
        raise ImageError("empty file", "empty")
      f = io.BytesIO(source)
    else:
      if os.path.getsize(source) == 0:
        raise ImageError("empty file", "empty")
      f = open(source, "rb")
    with f, warnings.catch_warnings():
      warnings.simplefilter("ignore")
      head = f.read(16)
      f.seek(0)
      im = Image.open(f)
      w, h = im.size
      if w * h > max_pixels:
        raise ImageError(
            f"image too large: {w}x{h} exceeds the limit of {max_pixels} pixels "
            f"(a decompression-bomb guard, set by prepro's or serve's --max_pixels)", "too_large")
      if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
      if size is not None and im.format == "JPEG":
        side = size if isinstance(size, int) else max(size)  # EXIF may swap w and h
        im.draft("RGB", (side, side))  # decode at a reduced scale: much faster
      im.load()
      ImageOps.exif_transpose(im, in_place=True)  # in place: no copy when upright
      return _rgb_resized(im, size)
  except ImageError:
    raise
  except FileNotFoundError:
    raise ImageError("file not found", "unreadable") from None
  except IsADirectoryError:
    raise ImageError("is a directory, not an image file", "unreadable") from None
  except PermissionError:
    raise ImageError("permission denied", "unreadable") from None
  except Image.UnidentifiedImageError:
    kind = _signature(head)
    if kind:
      raise ImageError(f"corrupt or truncated {kind} (its header cannot be read)") from None
    raise ImageError("not an image (unrecognized format)", "not_an_image") from None
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ImageError(f"corrupt or truncated image ({msg})") from None
  except Exception as e:  # PIL raises a zoo of errors on hostile input
    raise ImageError(f"cannot decode image ({type(e).__name__}: {e})") from None


def _rgb_resized(im: Image.Image, size) -> Image.Image:
  im = _to_rgb(im)
  if size is not None:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if im.size != (hw[1], hw[0]):
      im = im.resize((hw[1], hw[0]), Image.BICUBIC)
  return im


def from_pil(im: Image.Image, size: int | tuple[int, int] | None = None) -> np.ndarray:
  """An image already in memory -> uint8 RGB `[H, W, 3]`, as `load_image` treats a file.

  EXIF orientation applied, any mode converted to RGB (transparency on
  white), then resized (bicubic) to `size` if given. Raises ImageError.
  """
  try:
    w, h = im.size
    if w < 1 or h < 1:
      raise ImageError(f"image has no pixels ({w}x{h})")
    im = ImageOps.exif_transpose(im)  # a copy when it turns: the caller's image is untouched
    return np.asarray(_rgb_resized(im, size), dtype=np.uint8)
  except ImageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError(f"cannot convert image ({type(e).__name__}: {e})") from None


def encode_image(image, fmt: str = "jpeg", quality: int = 95) -> bytes:
  """uint8 [H, W, 3] (or an RGB PIL image) -> JPEG or PNG bytes."""
  buf = io.BytesIO()
  im = image if isinstance(image, Image.Image) else Image.fromarray(image)
  if fmt == "jpeg":
    im.save(buf, "JPEG", quality=quality)
  elif fmt == "png":
    im.save(buf, "PNG", compress_level=1)
  else:
    raise ValueError(f"unknown image format {fmt!r} (jpeg or png)")
  return buf.getvalue()
