"""The HTML gallery: escaping, and the page as headless Chromium renders it."""

import io
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image

from captionjax import gallery
from conftest import parse_html as _parse

HOSTILE_CAPTION = "<b>bold</b> & 'single' \"double\" <script>alert(1)</script>"
HOSTILE_NAME = 'x"><img src=x onerror=alert(1)>.png'
RESULTS = [
    {"image_id": 1, "file_name": HOSTILE_NAME, "caption": HOSTILE_CAPTION, "logprob": -3.25,
     "n_best": [{"caption": HOSTILE_CAPTION, "logprob": -3.25},
                {"caption": "a red &amp; <i>circle</i>", "logprob": -4.5}]},
    {"image_id": 7, "file_name": "sub/café ☕.jpg", "caption": "a green square", "logprob": -1.0,
     "n_best": [{"caption": "a green square", "logprob": -1.0},
                {"caption": "a green box", "logprob": -2.0}]},
    {"image_id": 9, "file_name": "quiet.png", "caption": "", "logprob": -0.5},
]
FAILURES = [("broken<1>.jpg", "not an image (unrecognized format)"),
            ("empty&.png", "empty file")]


def _solid_jpeg(color) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (160, 120), color).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def _check_page(c):
  """The page shows every string as text, and nothing the strings could inject."""
  figure_captions = [t for t in c.texts["caption"]]
  # Per figure: the top caption, then its n-best captions.
  want = [HOSTILE_CAPTION, HOSTILE_CAPTION, "a red &amp; <i>circle</i>",
          "a green square", "a green square", "a green box", "(empty caption)"]
  assert figure_captions == want
  assert c.texts["file"] == [HOSTILE_NAME, "sub/café ☕.jpg", "quiet.png",
                             "broken<1>.jpg", "empty&.png"]
  assert c.texts["reason"] == [r for _, r in FAILURES]
  assert "script" not in c.tags and "b" not in c.tags
  imgs = [a for t, a in c.attrs if t == "img"]
  assert [a["src"] for a in imgs] == ["thumbs/000001.jpg", "thumbs/000007.jpg"]
  assert imgs[0]["alt"] == HOSTILE_CAPTION and "onerror" not in imgs[0]
  assert c.tags.count("figure") == 3 and c.tags.count("li") == 4 + 2


def test_render_escapes_everything():
  page = gallery.render(RESULTS, FAILURES, title="t <x>", summary="s & <y>",
                        thumbs=[1, 7])
  c = _parse(page)
  _check_page(c)
  assert c.texts["summary"] == ["s & <y>"]


def test_thumbnail_keeps_aspect():
  image = np.zeros((300, 1200, 3), np.uint8)
  im = Image.open(io.BytesIO(gallery.thumbnail(image, 320)))
  assert im.format == "JPEG" and im.size == (320, 80)


def _chromium():
  for name in ("chromium", "chromium-browser", "google-chrome"):
    path = shutil.which(name)
    if path:
      return path
  if os.path.exists("/usr/bin/chromium"):
    return "/usr/bin/chromium"
  pytest.skip("no headless browser: install Debian's chromium package (.ci/run does)")


def _run_chromium(args, user_dir):
  cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={user_dir}"] + args
  return subprocess.run(cmd, capture_output=True, timeout=120, check=True)


def test_gallery_in_headless_chromium(tmp_path):
  thumbs = {1: _solid_jpeg((255, 0, 0)), 7: _solid_jpeg((0, 200, 0))}
  page = gallery.write_gallery(str(tmp_path / "gallery"), RESULTS, FAILURES, thumbs,
                               title="captions", summary="3 images")
  assert sorted(os.listdir(tmp_path / "gallery" / "thumbs")) == ["000001.jpg", "000007.jpg"]
  url = "file://" + os.path.abspath(page)
  with tempfile.TemporaryDirectory() as user_dir:
    dom = _run_chromium(["--dump-dom", url], user_dir).stdout.decode("utf-8")
  _check_page(_parse(dom))  # the DOM as the browser built it
  shot = tmp_path / "shot.png"
  with tempfile.TemporaryDirectory() as user_dir:
    _run_chromium(["--window-size=1100,800", f"--screenshot={shot}", url], user_dir)
  px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
  assert px.shape == (800, 1100, 3)
  # Both thumbnails were loaded from disk and painted.
  red = (px[..., 0] > 220) & (px[..., 1] < 40) & (px[..., 2] < 40)
  green = (px[..., 1] > 170) & (px[..., 0] < 40) & (px[..., 2] < 40)
  assert red.sum() > 5000 and green.sum() > 5000
