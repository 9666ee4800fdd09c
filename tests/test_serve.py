"""`captionjax serve`: the HTTP API against real server processes, bad inputs,
the metrics, the page in headless Chromium, and the attention weights.

Two servers run as subprocesses on free local ports for the whole module:
`server` (beam sizes 1-2, batches padded to 1 or 4, small body/pixel/image
limits) and `strict` (one image at a time, a queue of one, an API key, a
3 s timeout). Both use the session's JAX compilation cache.
"""

import base64
import concurrent.futures
import http.client
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "sekret-key"
MAX_BYTES, MAX_PIXELS, MAX_IMAGES = 2_000_000, 4_000_000, 5


# ---------------------------------------------------------------- helpers


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _request(url, data=None, content_type=None, headers=None, method=None, timeout=120):
  """(status, headers, body: parsed JSON when it is JSON, else text). Sends only the
  headers given (no default Content-Type)."""
  u = urllib.parse.urlsplit(url)
  h = dict(headers or {})
  if content_type is not None:
    h["Content-Type"] = content_type
  conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
  try:
    conn.request(method or ("GET" if data is None else "POST"),
                 u.path + (f"?{u.query}" if u.query else ""), body=data, headers=h)
    r = conn.getresponse()
    status, hdrs, raw = r.status, dict(r.getheaders()), r.read()
  finally:
    conn.close()
  hdrs = {k.lower(): v for k, v in hdrs.items()}
  ctype = hdrs.get("content-type", "")
  return status, hdrs, json.loads(raw) if ctype.startswith("application/json") else raw.decode()


def _multipart(parts):
  """[(field, file name or None, bytes or str)] -> (body, content type)."""
  boundary = "----captionjax-test-boundary"
  out = io.BytesIO()
  for field, name, data in parts:
    out.write(f"--{boundary}\r\n".encode())
    disp = f'form-data; name="{field}"' + (f'; filename="{name}"' if name is not None else "")
    out.write(f"Content-Disposition: {disp}\r\n".encode())
    if name is not None:
      out.write(b"Content-Type: application/octet-stream\r\n")
    out.write(b"\r\n")
    out.write(data if isinstance(data, bytes) else data.encode())
    out.write(b"\r\n")
  out.write(f"--{boundary}--\r\n".encode())
  return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


def _scene(seed: int, size=(96, 72)) -> Image.Image:
  """A distinct small picture: colored shapes on a background."""
  rng = np.random.default_rng(seed)
  im = Image.new("RGB", size, tuple(int(x) for x in rng.integers(0, 256, 3)))
  d = ImageDraw.Draw(im)
  for _ in range(3):
    x, y = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
    s = int(rng.integers(10, 30))
    color = tuple(int(v) for v in rng.integers(0, 256, 3))
    (d.ellipse if rng.random() < 0.5 else d.rectangle)([x, y, x + s, y + s], fill=color)
  return im


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
  """A PNG written by hand: raw is the filtered scanlines (PIL cannot write 16-bit RGB)."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
          + chunk(b"IEND", b""))


def _png_header_only(width: int, height: int) -> bytes:
  """A PNG that claims width x height (a decompression bomb's header) with little data."""
  return _png(width, height, 8, 0, b"\x00" * 1000)


def _png16_rgb(im: Image.Image) -> bytes:
  a = np.asarray(im.convert("RGB"), np.uint16) * 257  # -> [H, W, 3] in 0..65535
  raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)
  return _png(im.width, im.height, 16, 2, raw)


def _metrics(base, headers=None) -> dict:
  """{(name, ((label, value), ...)): value} of /metrics."""
  from prometheus_client.parser import text_string_to_metric_families  # pylint: disable=g-import-not-at-top
  status, _, text = _request(base + "/metrics", headers=headers)
  assert status == 200
  out = {}
  for fam in text_string_to_metric_families(text):
    for s in fam.samples:
      out[s.name, tuple(sorted(s.labels.items()))] = s.value
  return out


def _m(metrics, name, **labels):
  return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


class _Server:
  """`captionjax serve` as a subprocess; log in a file; stopped by stop()."""

  def __init__(self, workdir, cache, log_path, *flags, env=None):
    self.port = _free_port()
    self.base = f"http://127.0.0.1:{self.port}"
    self.log_path = log_path
    cmd = [sys.executable, "-m", "captionjax.cli", "serve", f"--checkpoint={workdir}",
           f"--port={self.port}", *flags]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", **(env or {}))
    self._log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                 env=env)

  def wait_ready(self, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
      if self.proc.poll() is not None:
        raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
      try:
        status, _, body = _request(self.base + "/healthz", timeout=5)
      except OSError:
        time.sleep(0.5)
        continue
      if status == 200:
        return
      assert status == 503 and body["status"] == "warming_up", body
      time.sleep(0.5)
    raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

  def log(self) -> str:
    with open(self.log_path, encoding="utf-8") as f:
      return f.read()[-5000:]

  def stop(self):
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=20)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self._log.close()


@pytest.fixture(scope="module")
def servers(trained_workdir, jax_compilation_cache, tmp_path_factory):
  """(server, strict), started together (their imports and compiles overlap).

  server: beam sizes 1-2, batches padded to 1 or 4, small body, pixel and
  image limits. strict: one image per model call, a queue of one image, an API
  key (from the environment), a 3 s timeout.
  """
  logs = tmp_path_factory.mktemp("serve")
  started = []
  try:
    started.append(_Server(
        trained_workdir, jax_compilation_cache, logs / "server.log",
        "--max_batch=4", "--max_beam_size=2", "--beam_size=2", "--max_wait_ms=50",
        f"--max_bytes={MAX_BYTES}", f"--max_pixels={MAX_PIXELS}", f"--max_images={MAX_IMAGES}",
        "--timeout_s=60"))
    started.append(_Server(
        trained_workdir, jax_compilation_cache, logs / "strict.log",
        "--max_batch=1", "--max_beam_size=1", "--beam_size=1", "--max_wait_ms=0",
        "--max_queue=1", "--max_images=1", "--timeout_s=3", env={"CAPTIONJAX_API_KEY": API_KEY}))
    for s in started:
      s.wait_ready()
    yield tuple(started)
  finally:
    for s in started:
      s.stop()


@pytest.fixture(scope="module")
def server(servers):
  return servers[0]


@pytest.fixture(scope="module")
def strict(servers):
  return servers[1]


@pytest.fixture(scope="module")
def reference(trained_workdir):
  """The in-process captioner the server must agree with: image bytes ->
  (captions, logprobs, attention weights [K, T, P]) at beam 2."""
  from captionjax import images, inference  # pylint: disable=g-import-not-at-top
  model = inference.load_workdir(trained_workdir)
  captioner = inference.BatchCaptioner(model, batch_size=1, beam_size=2, n_best=2,
                                       attention=True)

  def ref(data: bytes):
    x = model.preprocess(images.load_image(data, size=model.image_size))
    tokens, scores, weights = captioner.run(x[None])
    caps = [model.vocab.decode(t) for t in tokens[0]]
    return caps, scores[0], weights[0], tokens[0]
  ref.model = model
  return ref


def _check_against_reference(body, ref_out, n_best):
  caps, scores, weights, tokens = ref_out
  assert body["caption"] == caps[0]
  assert body["logprob"] == pytest.approx(float(scores[0]), abs=1e-3)
  assert [c["caption"] for c in body["n_best"]] == caps[:n_best]
  assert [c["logprob"] for c in body["n_best"]] == pytest.approx(
      [float(s) for s in scores[:n_best]], abs=1e-3)
  for k, alt in enumerate(body["n_best"]):
    n_words = len(alt["caption"].split())
    assert len(alt["words"]) == n_words
    assert [w["word"] for w in alt["words"]] == alt["caption"].split()
    for t, w in enumerate(alt["words"]):
      assert len(w["weights"]) == 9 and sum(w["weights"]) == pytest.approx(1.0, abs=1e-3)
      np.testing.assert_allclose(w["weights"], weights[k, t], atol=1e-3)
  assert body["attention"]["words"] == body["n_best"][0]["words"]


# ---------------------------------------------------------------- the API


def test_healthz_model_and_page(server, trained_workdir):
  status, _, body = _request(server.base + "/healthz")
  assert status == 200 and body["status"] == "ok" and body["programs"] == 2 * 2
  status, _, info = _request(server.base + "/v1/model")
  assert status == 200
  with open(os.path.join(trained_workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  with open(os.path.join(trained_workdir, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)["ix_to_word"]
  assert info["checkpoint"] == trained_workdir and info["vocab_size"] == len(vocab)
  assert info["config"] == config
  assert info["beam_sizes"] == [1, 2] and info["batch_sizes"] == [1, 4]
  assert info["attention"] == {"grid": [3, 3], "region": [0.0, 0.0, 1.0, 1.0]}
  assert info["limits"]["max_bytes"] == MAX_BYTES
  assert (info["min_length"], info["block_trigrams"]) == (1, False)
  assert ",".join(info["bad_endings"]) == config["bad_endings"]
  status, hdrs, page = _request(server.base + "/")
  assert status == 200 and hdrs["content-type"].startswith("text/html")
  assert 'id="files"' in page and "textContent" in page


def test_caption_raw_and_multipart_match_the_in_process_model(server, reference):
  data = _encode(_scene(1), "PNG")
  ref = reference(data)
  status, _, body = _request(server.base + "/v1/caption?n_best=2", data, "image/png")
  assert status == 200, body
  _check_against_reference(body, ref, 2)
  assert body["model"] == {"checkpoint": reference.model.workdir, "step": reference.model.step,
                           "beam_size": 2}
  assert body["ms"] > 0
  form, ctype = _multipart([("note", None, "hello"), ("image", "scene.png", data)])
  status, _, body2 = _request(server.base + "/v1/caption?n_best=2", form, ctype)
  assert status == 200, body2
  _check_against_reference(body2, ref, 2)
  # octet-stream is taken as an image body too; beam 1 is greedy: one caption.
  status, _, body3 = _request(server.base + "/v1/caption?beam_size=1", data,
                              "application/octet-stream")
  assert status == 200 and len(body3["n_best"]) == 1


def test_concurrent_requests_are_batched_without_mixing(server, reference):
  datas = [_encode(_scene(100 + i), "JPEG", quality=90) for i in range(12)]
  refs = [reference(d) for d in datas]
  before = _metrics(server.base)

  def post(d):
    return _request(server.base + "/v1/caption?n_best=2", d, "image/jpeg")
  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    results = list(pool.map(post, datas))
  for (status, _, body), ref in zip(results, refs):
    assert status == 200, body
    _check_against_reference(body, ref, 2)
  after = _metrics(server.base)
  calls = _m(after, "captionjax_batch_images_count") - _m(before, "captionjax_batch_images_count")
  images = _m(after, "captionjax_batch_images_sum") - _m(before, "captionjax_batch_images_sum")
  assert images == 12
  assert calls < 12  # at least one model call took several requests' images
  assert _m(after, "captionjax_http_requests_total", route="/v1/caption", status="200") - _m(
      before, "captionjax_http_requests_total", route="/v1/caption", status="200") == 12
  # Nothing compiled after warm-up, whatever the batch sizes were.
  assert _m(after, "captionjax_jax_compilations_total") == _m(
      before, "captionjax_jax_compilations_total")


def test_batch_endpoint(server, reference):
  good = [_encode(_scene(200 + i), "PNG") for i in range(3)]
  form, ctype = _multipart([("image", "a.png", good[0]), ("image", "<b>b</b>.png", good[1]),
                            ("images", "notes.txt", b"just some text"),
                            ("image", "empty.png", b""), ("image", "c.png", good[2])])
  status, _, body = _request(server.base + "/v1/caption:batch?n_best=2", form, ctype)
  assert status == 200, body
  res = body["results"]
  assert [r["index"] for r in res] == list(range(5))
  assert [r["file_name"] for r in res] == ["a.png", "<b>b</b>.png", "notes.txt", "empty.png",
                                           "c.png"]
  assert [r["status"] for r in res] == [200, 200, 422, 400, 200]
  assert res[2]["error"]["kind"] == "not_an_image" and res[3]["error"]["kind"] == "empty"
  for r, d in zip([res[0], res[1], res[4]], good):
    _check_against_reference(r, reference(d), 2)
  too_many, ctype = _multipart([("image", f"{i}.png", good[0]) for i in range(MAX_IMAGES + 1)])
  status, _, body = _request(server.base + "/v1/caption:batch", too_many, ctype)
  assert status == 413 and body["error"]["kind"] == "too_many_images"
  status, _, body = _request(server.base + "/v1/caption:batch", good[0], "image/png")
  assert status == 415


def _odd_images():
  """Valid images in awkward formats: each must get a caption."""
  base = _scene(7, (80, 60))
  rgba = base.convert("RGBA")
  rgba.putalpha(128)
  frames = [_scene(8, (80, 60)).convert("P"), _scene(9, (80, 60)).convert("P")]
  gif = io.BytesIO()
  frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees when shown
  deep = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)  # mode I;16
  return {
      "animated GIF": (gif.getvalue(), "image/gif"),
      "RGBA PNG": (_encode(rgba, "PNG"), "image/png"),
      "palette PNG": (_encode(base.convert("P"), "PNG"), "image/png"),
      "16-bit grayscale PNG": (_encode(deep, "PNG"), "image/png"),
      "16-bit RGB PNG": (_png16_rgb(base), "image/png"),
      "CMYK JPEG": (_encode(base.convert("CMYK"), "JPEG"), "image/jpeg"),
      "EXIF-rotated JPEG": (_encode(base, "JPEG", exif=exif), "image/jpeg"),
      "grayscale JPEG": (_encode(base.convert("L"), "JPEG"), "image/jpeg"),
      "WebP": (_encode(base, "WEBP"), "image/webp"),
      "BMP": (_encode(base, "BMP"), "image/bmp"),
      "TIFF": (_encode(base, "TIFF"), "image/tiff"),
      "JPEG sent as image/png": (_encode(base, "JPEG"), "image/png"),
  }


def _bad_inputs():
  """(name, body, content type, query, expected status, expected kind)."""
  jpeg = _encode(_scene(3), "JPEG")
  png = _encode(_scene(3), "PNG")
  big = _encode(Image.new("RGB", (2100, 2000), (10, 200, 30)), "PNG")  # 4.2 M pixels
  form_no_image, form_ctype = _multipart([("file", "x.png", png)])
  form_two, form_two_ctype = _multipart([("image", "x.png", png), ("image", "y.png", png)])
  return [
      ("not an image", b"hello, I am text" * 10, "image/png", "", 422, "not_an_image"),
      ("HTML page sent as an image", b"<html><body>hi</body></html>", "image/jpeg", "", 422,
       "not_an_image"),
      ("truncated JPEG", jpeg[:len(jpeg) // 2], "image/jpeg", "", 422, "corrupt"),
      ("truncated PNG", png[:len(png) * 2 // 3], "image/png", "", 422, "corrupt"),
      ("PNG header only", png[:40], "image/png", "", 422, "corrupt"),
      ("empty body", b"", "image/jpeg", "", 400, "empty"),
      ("decompression bomb (PNG claiming 30000x30000)", _png_header_only(30000, 30000),
       "image/png", "", 413, "too_large"),
      ("over --max_pixels (2100x2000)", big, "image/png", "", 413, "too_large"),
      ("over --max_bytes", os.urandom(MAX_BYTES + 1000), "image/jpeg", "", 413, "body_too_large"),
      ("wrong content type text/plain", png, "text/plain", "", 415, "unsupported_media_type"),
      ("wrong content type application/json", b'{"image": "x"}', "application/json", "", 415,
       "unsupported_media_type"),
      ("no content type", png, None, "", 415, "unsupported_media_type"),
      ("multipart without an `image` field", form_no_image, form_ctype, "", 400, "bad_request"),
      ("multipart with two images", form_two, form_two_ctype, "", 400, "bad_request"),
      ("malformed multipart (no boundary)", b"--x\r\n\r\n", "multipart/form-data", "", 400,
       "bad_multipart"),
      ("n_best above the beam size", png, "image/png", "?n_best=3", 400, "bad_parameter"),
      ("beam size above --max_beam_size", png, "image/png", "?beam_size=7", 400, "bad_parameter"),
      ("beam size not a number", png, "image/png", "?beam_size=two", 400, "bad_parameter"),
  ]


def test_bad_inputs_get_clear_4xx_and_odd_images_a_caption(server):
  before = _metrics(server.base)
  kinds = {}
  report = []
  for name, body, ctype, query, want_status, want_kind in _bad_inputs():
    status, _, out = _request(server.base + "/v1/caption" + query, body, ctype, method="POST")
    report.append(f"{status} {name}")
    assert (status, out["error"]["kind"]) == (want_status, want_kind), (name, out)
    assert out["error"]["message"] and "\n" not in out["error"]["message"]
    kinds[want_kind] = kinds.get(want_kind, 0) + 1
  for name, (data, ctype) in _odd_images().items():
    status, _, out = _request(server.base + "/v1/caption", data, ctype)
    report.append(f"{status} {name}")
    assert status == 200, (name, out)
    assert isinstance(out["caption"], str) and len(out["n_best"]) == 1
  status, _, out = _request(server.base + "/v1/caption", method="GET")
  assert (status, out["error"]["kind"]) == (405, "method_not_allowed")
  status, _, out = _request(server.base + "/v2/caption", b"x", "image/png")
  assert (status, out["error"]["kind"]) == (404, "not_found")
  print("\n".join(report))
  # Still alive, and the error counters moved by exactly the errors sent.
  assert _request(server.base + "/healthz")[0] == 200
  after = _metrics(server.base)
  for kind, n in kinds.items():
    assert _m(after, "captionjax_errors_total", kind=kind) - _m(
        before, "captionjax_errors_total", kind=kind) == n, kind
  assert _m(after, "captionjax_errors_total", kind="internal") == 0


def _raw_http(port: int, data: bytes) -> str:
  """Sends bytes as they are; returns the server's response (head and body)."""
  with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
    s.sendall(data)
    got = b""
    while True:
      chunk = s.recv(65536)
      got += chunk
      head, sep, body = got.partition(b"\r\n\r\n")
      if not chunk or (sep and len(body) >= int(
          re.search(rb"content-length: *(\d+)", head, re.I).group(1))):
        return got.decode("utf-8", "replace")


def test_slow_upload_times_out_and_huge_bodies_get_413_at_once(strict):
  head = (b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
          b"X-API-Key: " + API_KEY.encode() + b"\r\n")
  # 1000 bytes announced, 4 sent: answered when --timeout_s (3 s) runs out.
  reply = _raw_http(strict.port, head + b"Content-Length: 1000\r\n\r\n\x89PNG")
  assert reply.startswith("HTTP/1.1 408"), reply
  assert '"kind": "timeout"' in reply
  # A Content-Length far beyond the limit: refused at once, before any body.
  reply = _raw_http(strict.port, head + b"Content-Length: 10000000000\r\n\r\n")
  assert reply.startswith("HTTP/1.1 413"), reply
  assert '"kind": "body_too_large"' in reply


def test_api_key(strict):
  png = _encode(_scene(5), "PNG")
  url = strict.base + "/v1/caption"
  status, hdrs, out = _request(url, png, "image/png")
  assert (status, out["error"]["kind"]) == (401, "unauthorized")
  assert hdrs["www-authenticate"].startswith("Bearer")
  assert _request(url, png, "image/png", {"Authorization": "Bearer wrong"})[0] == 401
  assert _request(url, png, "image/png", {"Authorization": f"Bearer {API_KEY}"})[0] == 200
  assert _request(url, png, "image/png", {"X-API-Key": API_KEY})[0] == 200
  assert _request(strict.base + "/v1/model")[0] == 401
  assert _request(strict.base + "/metrics")[0] == 401
  assert _request(strict.base + "/healthz")[0] == 200
  assert _request(strict.base + "/")[0] == 200


def test_full_queue_gets_503_with_retry_after(strict):
  headers = {"Authorization": f"Bearer {API_KEY}"}
  datas = [_encode(_scene(300 + i), "PNG") for i in range(24)]

  def post(d):
    return _request(strict.base + "/v1/caption", d, "image/png", headers)
  seen = []
  for _ in range(5):  # bursts until one finds the queue (of one image) full
    with concurrent.futures.ThreadPoolExecutor(len(datas)) as pool:
      seen += list(pool.map(post, datas))
    if any(s == 503 for s, _, _ in seen):
      break
  full = [(h, b) for s, h, b in seen if s == 503]
  assert full, "the queue never filled"
  assert all(b["error"]["kind"] == "queue_full" and h["retry-after"] == "1" for h, b in full)
  assert {s for s, _, _ in seen} <= {200, 503, 504}  # 504: past the 3 s timeout
  assert _request(strict.base + "/healthz")[0] == 200


def test_bad_command_lines_exit_2(tmp_path, capsys):
  from captionjax import cli  # pylint: disable=g-import-not-at-top
  port = _free_port()
  assert cli.main(["serve", f"--checkpoint={tmp_path}/nothing", f"--port={port}"]) == 2
  assert "no such directory" in capsys.readouterr().err
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    assert cli.main(["serve", f"--checkpoint={tmp_path}",
                     f"--port={busy.getsockname()[1]}"]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_decoding_flags():
  import argparse  # pylint: disable=g-import-not-at-top
  from captionjax import decode, serve  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser()
  serve.add_arguments(p)
  args = p.parse_args(["--checkpoint=x", "--min_length=2", "--block_trigrams",
                       "--bad_endings=a,the"])
  assert serve.decode_options(args, {"length_penalty": 0.5}) == decode.DecodeOptions(
      length_penalty=0.5, min_length=2, block_trigrams=True, bad_endings=("a", "the"))
  args = p.parse_args(["--checkpoint=x"])
  assert serve.decode_options(args, {"bad_endings": "with"}).bad_endings == ("with",)
  assert serve.decode_options(args, {}).bad_endings == decode.BAD_ENDINGS
  args = p.parse_args(["--checkpoint=x", "--bad_endings=none", "--min_length=-1"])
  with pytest.raises(ValueError, match="--min_length=-1"):
    serve.decode_options(args, {})


def test_batch_sizes():
  from captionjax import serve  # pylint: disable=g-import-not-at-top
  assert serve.batch_sizes(1) == [1]
  assert serve.batch_sizes(4) == [1, 4]
  assert serve.batch_sizes(32) == [1, 4, 16, 32]
  assert serve.batch_sizes(64) == [1, 4, 16, 64]


# ---------------------------------------------------------------- attention weights


def test_attention_fn_matches_a_numpy_reference():
  """The weights of each word: the LM re-run by hand in numpy (LSTM, additive attention)."""
  from captionjax import configs, inference, vocab  # pylint: disable=g-import-not-at-top
  config = configs.load_config("default", [
      "model.input_encoding_size=16", "model.rnn_size=12", "model.cnn_kwargs.widths=(4, 8, 8)",
      "model.cnn_kwargs.cell_fc=8"])
  model = inference.random_model(config, vocab.Vocabulary(["a", "b", "c", "d"]), 32, 5, seed=3)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  tokens = np.array([[[1, 3, 2, 0, 0, 0], [4, 0, 0, 0, 0, 0]],
                     [[2, 2, 1, 4, 3, 0], [3, 1, 0, 0, 0, 0]]], np.int32)  # [B=2, K=2, T=6]
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(inference.attention_fn(model))(
        model.params, model.batch_stats, images, tokens))
    feats = np.asarray(model.cnn.apply({"params": model.params["cnn"],
                                        "batch_stats": model.batch_stats},
                                       images.astype(np.float32) / 255.0, train=False), np.float64)
  assert got.shape == (2, 2, 6, 9)
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), model.params)
  emb, lm = p["img_embed"], p["lm"]
  sig = lambda x: 1 / (1 + np.exp(-x))

  def lstm(c, h, x):
    cell = lm["cells_0"]
    z = x @ cell["i2h"]["kernel"] + cell["i2h"]["bias"] + h @ cell["h2h"]["kernel"] + cell["h2h"]["bias"]
    i, f, o, g = np.split(z, 4)
    c = sig(f) * c + sig(i) * np.tanh(g)
    return c, sig(o) * np.tanh(c)

  for b in range(2):
    regions = np.maximum(feats[b].reshape(9, -1) @ emb["kernel"] + emb["bias"] + emb["pos"], 0)
    keys = regions @ lm["att_key"]["kernel"] + lm["att_key"]["bias"]  # -> [P, E]
    for k in range(2):
      c, h = lstm(np.zeros(12), np.zeros(12), regions.mean(0))
      prev = 0  # START
      for t in range(6):
        x = lm["embed"]["embedding"][prev]
        q = np.concatenate([h, x]) @ lm["att_query"]["kernel"]
        s = (np.tanh(keys + q) @ lm["att_score"]["kernel"])[:, 0]
        w = np.exp(s - s.max())
        w /= w.sum()
        np.testing.assert_allclose(got[b, k, t], w, rtol=1e-4, atol=1e-5)
        c, h = lstm(c, h, x + w @ regions)
        prev = tokens[b, k, t]


# ---------------------------------------------------------------- the page in Chromium


def _chromium():
  for name in ("chromium", "chromium-browser", "google-chrome"):
    path = shutil.which(name)
    if path:
      return path
  pytest.skip("no headless browser: install Debian's chromium package (.ci/run does)")


class _DevTools:
  """Headless Chromium driven through the DevTools protocol over a pipe
  (--remote-debugging-pipe: JSON messages ending in NUL on fds 3 and 4)."""

  def __init__(self, user_dir):
    to_chrome_r, self._to_chrome = os.pipe()
    self._from_chrome, from_chrome_w = os.pipe()
    # bash (not sh: dash's redirections take one-digit fds only) puts the pipe ends on 3 and 4.
    cmd = [shutil.which("bash") or "/bin/bash", "-c",
           f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', _chromium(),
           "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--remote-debugging-pipe", "--window-size=1200,900", f"--user-data-dir={user_dir}",
           "about:blank"]
    self.proc = subprocess.Popen(cmd, pass_fds=(to_chrome_r, from_chrome_w),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    self._id = 0
    self._buf = b""
    self.events = []
    self._replies = {}
    self._lock = threading.Lock()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    while True:
      try:
        data = os.read(self._from_chrome, 65536)
      except OSError:
        return
      if not data:
        return
      self._buf += data
      while b"\0" in self._buf:
        raw, self._buf = self._buf.split(b"\0", 1)
        msg = json.loads(raw)
        with self._lock:
          if "id" in msg:
            self._replies[msg["id"]] = msg
          else:
            self.events.append(msg)

  def send(self, method, params=None, session=None, timeout=60):
    self._id += 1
    msg = {"id": self._id, "method": method, "params": params or {}}
    if session:
      msg["sessionId"] = session
    os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
    t0 = time.time()
    while time.time() - t0 < timeout:
      with self._lock:
        reply = self._replies.pop(self._id, None)
      if reply is not None:
        if "error" in reply:
          raise AssertionError(f"{method}: {reply['error']}")
        return reply["result"]
      time.sleep(0.02)
    raise AssertionError(f"{method}: no reply in {timeout}s")

  def close(self):
    try:
      self.send("Browser.close", timeout=10)
    except (AssertionError, OSError):
      pass
    try:
      self.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    os.close(self._to_chrome)
    os.close(self._from_chrome)


def test_page_in_headless_chromium_picks_a_file_and_shows_its_caption(server, reference,
                                                                      tmp_path):
  hostile = '<img src=x onerror="document.title=1">.png'
  path = tmp_path / hostile
  picture = Image.new("RGB", (120, 90), (20, 180, 240))
  ImageDraw.Draw(picture).rectangle([10, 10, 40, 40], fill=(250, 250, 0))
  data = _encode(picture, "PNG")
  path.write_bytes(data)
  caps, scores, _, _ = reference(data)
  with tempfile.TemporaryDirectory() as user_dir:
    browser = _DevTools(user_dir)
    try:
      target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
      sid = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
          "sessionId"]
      browser.send("Page.enable", session=sid)

      def js(expr):
        return browser.send("Runtime.evaluate", {"expression": expr, "returnByValue": True},
                            sid)["result"].get("value")
      browser.send("Page.navigate", {"url": server.base + "/"}, sid)
      t0 = time.time()
      while js("document.readyState + ':' + document.getElementById('beam').options.length") \
          != "complete:2":
        assert time.time() - t0 < 60, "the page did not load the model's description"
        time.sleep(0.1)
      root = browser.send("DOM.getDocument", {}, sid)["root"]["nodeId"]
      node = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#files"}, sid)[
          "nodeId"]
      browser.send("DOM.setFileInputFiles", {"files": [str(path)], "nodeId": node}, sid)
      t0 = time.time()
      while not js("document.querySelector('.result img') !== null && "
                   "document.querySelector('.result img').complete && "
                   "document.querySelector('.result .caption').textContent !== 'captioning…'"):
        assert time.time() - t0 < 60, "no caption appeared"
        time.sleep(0.1)
      shown = js("""JSON.stringify({
          caption: document.querySelector('.result .caption').textContent,
          file: document.querySelector('.result .file').textContent,
          nbest: [...document.querySelectorAll('.result ol.nbest > li > .caption')]
                 .map(e => e.textContent),
          injected: document.querySelectorAll('img[onerror]').length,
          title: document.title,
          imgs: [...document.querySelectorAll('.result img')].map(i => i.naturalWidth)})""")
      shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, sid)[
          "data"])
    finally:
      browser.close()
  shown = json.loads(shown)
  assert shown["caption"] == (caps[0] or "(empty caption)")
  assert shown["nbest"] == [c or "(empty caption)" for c in caps]  # the page asks for 2
  assert shown["file"] == hostile  # shown as text, not parsed
  assert shown["injected"] == 0 and shown["title"] == "captionjax"
  assert shown["imgs"] == [120]  # the picked file itself is shown
  assert not any(e.get("method") == "Page.javascriptDialogOpening" for e in browser.events)
  (tmp_path / "page.png").write_bytes(shot)
  px = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
  blue = (np.abs(px - [20, 180, 240]).max(-1) < 12).sum()
  assert blue > 0.5 * 340 * 255 * (1 - 31 * 31 / (120 * 90))  # the picked image, painted at 340 px
