"""`captionjax serve`: caption images over HTTP, with dynamic batching.

    captionjax serve --checkpoint=runs/default [--host=127.0.0.1 --port=8080]
        [--beam_size=2 --max_beam_size=3 --max_batch=32 --max_wait_ms=10]
        [--min_length=1 --block_trigrams --bad_endings=WORDS]
        [--max_bytes=16777216 --max_pixels=50000000 --max_images=64]
        [--timeout_s=30 --max_queue=256 --api_key=KEY (or $CAPTIONJAX_API_KEY)]

Endpoints (JSON in and out, except the page and the metrics):
  POST /v1/caption        one image: the raw body (Content-Type image/* or
                          application/octet-stream), or a multipart/form-data
                          field named `image`; ?beam_size=B&n_best=K.
                          -> {"caption", "logprob", "n_best": [{"caption",
                          "logprob"}], "attention" (attention models only),
                          "model": {...}, "ms"}
  POST /v1/caption:batch  several images as multipart/form-data, every file
                          part in order -> {"results": [a result or an
                          {"error"} per image], "model", "ms"}
  GET  /healthz           200 once every program is compiled, 503 before
  GET  /v1/model          checkpoint, step, vocabulary size, config, limits
  GET  /metrics           Prometheus text: requests, errors by kind, latency,
                          batch sizes, compilations, the process's memory
  GET  /                  a page to drop or pick images and see their captions

Errors are {"error": {"kind", "message"}} with a 4xx status (503 when the
queue is full or the model is still compiling, with Retry-After; 504 when a
request runs past --timeout_s). With an API key, /v1/* and /metrics need
`Authorization: Bearer KEY` (or `X-API-Key: KEY`); the page and /healthz don't.

Dynamic batching: the requests' images wait in one queue; a model thread
takes up to --max_batch images of one beam size as soon as the oldest has
waited --max_wait_ms (at once when the model was busy meanwhile), pads them to
the next of a few fixed batch sizes (1, 4, 16, ... up to --max_batch) and runs
one jitted program. Every (beam size, batch size) program is compiled before
/healthz turns ready, so nothing compiles afterwards. Images are decoded by a
thread pool, off the event loop.

Dimensions: B images per model call, K beams, T tokens per caption, P grid
cells the LM attends over (G x G), S model input size.
"""

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import importlib.resources
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
import prometheus_client as prom
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
import uvicorn

from captionjax import caption
from captionjax import decode
from captionjax import images as images_lib
from captionjax import inference

API_KEY_ENV = "CAPTIONJAX_API_KEY"
ROUTES = ("/", "/healthz", "/metrics", "/v1/model", "/v1/caption", "/v1/caption:batch")
RAW_TYPES = ("application/octet-stream",)  # besides image/*
log = logging.getLogger("captionjax.serve")


def add_arguments(p):
  p.formatter_class = argparse.RawDescriptionHelpFormatter
  p.epilog = __doc__.split("\n", 1)[1]
  p.add_argument("--checkpoint", required=True,
                 help="a `captionjax train` workdir (its latest checkpoint is used)")
  p.add_argument("--step", type=int, default=None, help="a checkpoint step instead of the latest")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)")
  p.add_argument("--port", type=int, default=8080, help="TCP port")
  p.add_argument("--beam_size", type=int, default=2, help="beam size when a request gives none")
  p.add_argument("--max_beam_size", type=int, default=3,
                 help="requests may ask for beam sizes 1..N (each is compiled at start-up)")
  p.add_argument("--length_penalty", type=float, default=None,
                 help="beam search length normalization exponent (default: the training config's)")
  caption.add_rule_arguments(p)
  p.add_argument("--max_batch", type=int, default=32, help="most images in one model call")
  p.add_argument("--max_wait_ms", type=float, default=10.0,
                 help="how long the oldest queued image waits for others to join its batch")
  p.add_argument("--max_bytes", type=int, default=16 * 2**20, help="largest request body, bytes")
  p.add_argument("--max_pixels", type=int, default=50_000_000,
                 help="largest image, width x height (a decompression-bomb guard)")
  p.add_argument("--max_images", type=int, default=64, help="most images in one batch request")
  p.add_argument("--max_queue", type=int, default=256,
                 help="most images waiting for the model; beyond, 503 with Retry-After")
  p.add_argument("--timeout_s", type=float, default=30.0,
                 help="a request running longer gets 408 (body upload) or 504 (captioning)")
  p.add_argument("--api_key", default=None,
                 help=f"require this key on /v1/* and /metrics (default: ${API_KEY_ENV}; "
                      "empty: no key)")
  p.add_argument("--no_attention", action="store_true",
                 help="leave out where each word looked (attention models): faster model calls")
  p.add_argument("--workers", type=int, default=2, help="image decoding threads")
  p.add_argument("--compile_threads", type=int, default=min(4, os.cpu_count() or 1),
                 help="programs compiled at once at start-up")
  p.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
  p.add_argument("--access_log", action="store_true", help="log every request")


# ---------------------------------------------------------------- errors and limits


class ServeError(Exception):
  """A request that gets an error response: status, kind (a metrics label), one-line message."""

  def __init__(self, status: int, kind: str, message: str, headers: Optional[dict] = None):
    super().__init__(message)
    self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


# ImageError kinds (captionjax.images) -> HTTP status.
IMAGE_ERROR_STATUS = {"empty": 400, "too_large": 413, "not_an_image": 422, "corrupt": 422,
                      "unreadable": 422}


@dataclasses.dataclass
class Limits:
  max_bytes: int = 16 * 2**20
  max_pixels: int = 50_000_000
  max_images: int = 64
  max_queue: int = 256
  timeout_s: float = 30.0

  def check(self):
    for name, value in dataclasses.asdict(self).items():
      if value <= 0:
        raise ValueError(f"--{name}={value}: must be > 0")
    if self.max_queue < self.max_images:
      raise ValueError(f"--max_queue={self.max_queue} is below --max_images={self.max_images}: "
                       "a full batch request could never be queued")


def batch_sizes(max_batch: int) -> List[int]:
  """The padded batch sizes: powers of 4 below max_batch, and max_batch (1, 4, 16, 32)."""
  sizes, b = [], 1
  while b < max_batch:
    sizes.append(b)
    b *= 4
  return sizes + [max_batch]


# ---------------------------------------------------------------- metrics


class Metrics:
  """The server's Prometheus metrics, in a registry of their own."""

  def __init__(self):
    prom.disable_created_metrics()  # no *_created series: counts and sums only
    self.registry = prom.CollectorRegistry()
    r = self.registry
    prom.ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, ...
    self.requests = prom.Counter("captionjax_http_requests", "HTTP requests by route and status",
                                 ["route", "status"], registry=r)
    self.errors = prom.Counter("captionjax_errors", "errors by kind (per image in batch requests)",
                               ["kind"], registry=r)
    self.latency = prom.Histogram(
        "captionjax_request_duration_seconds", "time from request to response, by route",
        ["route"], registry=r,
        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
    self.batch_images = prom.Histogram(
        "captionjax_batch_images", "images per model call (before padding)", registry=r,
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    self.model_calls = prom.Counter("captionjax_model_calls", "model calls by padded batch size",
                                    ["beam_size", "padded"], registry=r)
    self.model_seconds = prom.Histogram(
        "captionjax_model_call_seconds", "time of one model call", registry=r,
        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
    self.images = prom.Counter("captionjax_images_captioned", "images captioned", registry=r)
    self.queue = prom.Gauge("captionjax_queue_images", "images waiting for the model", registry=r)
    self.ready = prom.Gauge("captionjax_ready", "1 once every program is compiled", registry=r)
    self.compilations = prom.Counter(
        "captionjax_jax_compilations", "programs compiled by XLA (flat after warm-up)", registry=r)
    self._listening = False

  def listen_to_jax(self):
    """Counts XLA compilations (jax.monitoring's backend-compile events)."""
    if self._listening:
      return

    def on_event(event, duration, **kwargs):  # pylint: disable=unused-argument
      if event == "/jax/core/compile/backend_compile_duration":
        self.compilations.inc()
    jax.monitoring.register_event_duration_secs_listener(on_event)
    self._listening = True

  def text(self) -> Tuple[bytes, str]:
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST


# ---------------------------------------------------------------- the model side


@dataclasses.dataclass
class Job:
  """One image waiting for the model."""
  image: np.ndarray  # uint8 [S, S, 3]
  beam_size: int
  future: concurrent.futures.Future
  queued: float  # time.monotonic() when it joined the queue


class QueueFull(Exception):
  pass


class Batcher:
  """Runs the model in one thread on batches gathered from a queue of images.

  Programs: one inference.BatchCaptioner per (beam size, padded batch size),
  each returning all K beams (and the attention weights of attention models).
  A job's future gets {"captions": [(caption, logprob, words)] * K}, best
  first, with words = [(word, weights [P] or None)].
  """

  def __init__(self, model, beam_sizes: Sequence[int], sizes: Sequence[int],
               options: decode.DecodeOptions, max_wait_s: float, max_queue: int,
               metrics: Metrics, attention: bool = True):
    self.model = model
    self.attention = attention and inference.attention_regions(model) > 0
    self.beam_sizes, self.sizes = tuple(beam_sizes), tuple(sizes)
    self.options = options  # the beam size is each program's own
    self.max_wait_s, self.max_queue = max_wait_s, max_queue
    self.metrics = metrics
    self.programs: Dict[Tuple[int, int], object] = {}
    self.compiled, self.total = 0, len(self.beam_sizes) * len(self.sizes)
    self.ready = threading.Event()
    self.failed = ""  # why warm-up failed
    self.warmup_s = 0.0
    self._cond = threading.Condition()
    self._pending: collections.deque = collections.deque()
    self._stop = False
    self._thread: Optional[threading.Thread] = None

  @property
  def max_batch(self) -> int:
    return self.sizes[-1]

  def warm_up(self, threads: int = 1) -> None:
    """Builds and compiles every program (`threads` at a time), then starts the model thread."""
    t0 = time.perf_counter()
    s = self.model.input_size

    def build(key):
      beam, size = key
      if self._stop:
        return
      p = inference.BatchCaptioner(self.model, batch_size=size, n_best=beam,
                                   options=self.options.replace(beam_size=beam),
                                   attention=self.attention)
      p.run(np.zeros((size, s, s, 3), np.uint8))  # compiles everything a call runs
      with self._cond:
        self.programs[key] = p
        self.compiled += 1
    keys = [(beam, size) for beam in self.beam_sizes for size in self.sizes]
    try:
      with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(build, keys))
    except Exception as e:  # pylint: disable=broad-except
      self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
      log.error("warm-up failed: %s", self.failed)
      return
    if self._stop:
      return
    self.warmup_s = time.perf_counter() - t0
    self._thread = threading.Thread(target=self._loop, name="captionjax-model", daemon=True)
    self._thread.start()
    self.ready.set()
    self.metrics.ready.set(1)
    log.info("ready: %d programs (beam sizes %s x batch sizes %s) compiled in %.1fs",
             self.total, list(self.beam_sizes), list(self.sizes), self.warmup_s)

  def submit(self, images: Sequence[np.ndarray], beam_size: int) -> List[concurrent.futures.Future]:
    """Queues images (all or none); raises QueueFull."""
    now = time.monotonic()
    with self._cond:
      if len(self._pending) + len(images) > self.max_queue:
        raise QueueFull()
      jobs = [Job(x, beam_size, concurrent.futures.Future(), now) for x in images]
      self._pending.extend(jobs)
      self.metrics.queue.set(len(self._pending))
      self._cond.notify()
    return [j.future for j in jobs]

  def close(self) -> None:
    with self._cond:
      self._stop = True
      while self._pending:
        self._pending.popleft().future.cancel()
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout=30)

  def _take(self) -> List[Job]:
    """Waits for a batch: up to max_batch jobs of the oldest job's beam size."""
    with self._cond:
      while not self._pending and not self._stop:
        self._cond.wait()
      if self._stop:
        return []
      first = self._pending[0]
      deadline = first.queued + self.max_wait_s
      while not self._stop:
        same = sum(1 for j in self._pending if j.beam_size == first.beam_size)
        left = deadline - time.monotonic()
        if same >= self.max_batch or left <= 0:
          break
        self._cond.wait(left)
      batch, keep = [], collections.deque()
      for j in self._pending:
        if j.beam_size == first.beam_size and len(batch) < self.max_batch:
          batch.append(j)
        else:
          keep.append(j)
      self._pending = keep
      self.metrics.queue.set(len(keep))
    # Requests that timed out or went away meanwhile are dropped here.
    return [j for j in batch if j.future.set_running_or_notify_cancel()]

  def _loop(self) -> None:
    while not self._stop:
      batch = self._take()
      if not batch:
        continue
      try:
        results = self.run([j.image for j in batch], batch[0].beam_size)
      except Exception as e:  # pylint: disable=broad-except
        log.exception("model call failed")
        for j in batch:
          j.future.set_exception(e)
        continue
      for j, r in zip(batch, results):
        j.future.set_result(r)

  def run(self, images: Sequence[np.ndarray], beam_size: int) -> List[dict]:
    """Captions up to max_batch images with the smallest program that fits them."""
    n = len(images)
    size = next(s for s in self.sizes if s >= n)
    program = self.programs[beam_size, size]
    t0 = time.perf_counter()
    tokens, scores, weights = program.run(np.stack(images))  # -> [n, K, T], [n, K], [n, K, T, P]
    self.metrics.model_seconds.observe(time.perf_counter() - t0)
    self.metrics.batch_images.observe(n)
    self.metrics.model_calls.labels(str(beam_size), str(size)).inc()
    self.metrics.images.inc(n)
    vocab = self.model.vocab
    out = []
    for i in range(n):
      captions = []
      for k in range(tokens.shape[1]):
        if scores[i, k] <= decode.NEG_INF / 2:  # no caption in this slot
          continue
        words = []
        for t, tok in enumerate(tokens[i, k]):
          if tok == decode.END_ID:
            break
          words.append((vocab.decode([tok]), None if weights is None else weights[i, k, t]))
        captions.append((vocab.decode(tokens[i, k]), float(scores[i, k]), words))
      out.append({"captions": captions})
    return out


# ---------------------------------------------------------------- the HTTP side


def _json(obj, status: int = 200, headers: Optional[dict] = None):
  body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
  return Response(body, status, headers=headers, media_type="application/json")


def _media_type(request) -> str:
  return request.headers.get("content-type", "").split(";")[0].strip().lower()


def page_html() -> str:
  """The page served at / (captionjax/static/index.html)."""
  return importlib.resources.files("captionjax").joinpath("static/index.html").read_text("utf-8")


class Server:
  """The HTTP API on top of a Batcher (a Starlette app: `self.app`)."""

  def __init__(self, model, batcher: Batcher, limits: Limits, default_beam: int,
               api_key: str = "", workers: int = 2, metrics: Optional[Metrics] = None,
               warm_up: bool = True, compile_threads: int = 1):
    self.model, self.batcher, self.limits = model, batcher, limits
    self.default_beam = default_beam
    self.api_key = api_key or ""
    self.metrics = metrics or batcher.metrics
    self.workers, self.compile_threads = workers, compile_threads
    self._decoder: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._warm_up = warm_up
    self._page = page_html()
    p = inference.attention_regions(model) if batcher.attention else 0
    g = int(round(math.sqrt(p))) if p else 0
    o = (model.image_size - model.input_size) / 2 / model.image_size
    self.attention_info = None if not p else {
        "grid": [g, g],
        # The part of the image the grid covers, as fractions [x0, y0, x1, y1]:
        # images are resized to image_size (aspect not kept), then center-cropped.
        "region": [round(o, 6), round(o, 6), round(1 - o, 6), round(1 - o, 6)]}
    routes = [
        Route("/", self.page, methods=["GET"]),
        Route("/healthz", self.healthz, methods=["GET"]),
        Route("/metrics", self.metrics_text, methods=["GET"]),
        Route("/v1/model", self.model_info, methods=["GET"]),
        Route("/v1/caption", self.caption, methods=["POST"]),
        Route("/v1/caption:batch", self.caption_batch, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=self._lifespan,
                    exception_handlers={HTTPException: self._http_error,
                                        Exception: self._internal_error})
    self.app = self._instrument(app)

  # ---- life cycle

  def _lifespan(self, app):  # pylint: disable=unused-argument
    server = self

    class Lifespan:
      async def __aenter__(self):
        server._decoder = concurrent.futures.ThreadPoolExecutor(
            max(1, server.workers), thread_name_prefix="captionjax-decode")
        if server._warm_up:
          threading.Thread(target=server.batcher.warm_up, args=(server.compile_threads,),
                           name="captionjax-warmup", daemon=True).start()

      async def __aexit__(self, *exc):
        server.batcher.close()
        server._decoder.shutdown(wait=False, cancel_futures=True)

    return Lifespan()

  def _instrument(self, app):
    """ASGI wrapper: requests and latency by route and status."""
    metrics = self.metrics

    async def wrapped(scope, receive, send):
      if scope["type"] != "http":
        return await app(scope, receive, send)
      route = scope.get("path", "")
      route = route if route in ROUTES else "other"
      t0 = time.perf_counter()
      status = [500]

      async def send_status(message):
        if message["type"] == "http.response.start":
          status[0] = message["status"]
        await send(message)
      try:
        await app(scope, receive, send_status)
      finally:
        metrics.requests.labels(route, str(status[0])).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - t0)
    return wrapped

  # ---- errors

  def error(self, e: ServeError):
    self.metrics.errors.labels(e.kind).inc()
    return _json({"error": {"kind": e.kind, "message": e.message}}, e.status, e.headers)

  async def _http_error(self, request, exc):  # 404, 405 from the router
    kinds = {404: "not_found", 405: "method_not_allowed"}
    msg = {404: f"no such endpoint: {request.method} {request.url.path} (see GET /)",
           405: f"{request.method} is not allowed on {request.url.path}"}.get(
               exc.status_code, str(exc.detail))
    return self.error(ServeError(exc.status_code, kinds.get(exc.status_code, "http"), msg,
                                 dict(exc.headers or {})))

  async def _internal_error(self, request, exc):  # pylint: disable=unused-argument
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return self.error(ServeError(500, "internal", f"internal error ({type(exc).__name__})"))

  def _check_key(self, request) -> None:
    if not self.api_key:
      return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get(
        "x-api-key", "")
    if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
      raise ServeError(401, "unauthorized",
                       "missing or wrong API key (send Authorization: Bearer KEY)",
                       {"WWW-Authenticate": 'Bearer realm="captionjax"'})

  def _check_ready(self) -> None:
    if not self.batcher.ready.is_set():
      why = (f"warm-up failed: {self.batcher.failed}" if self.batcher.failed else
             f"the model is compiling ({self.batcher.compiled} of {self.batcher.total} programs)")
      raise ServeError(503, "not_ready", why, {"Retry-After": "5"})

  def _options(self, request) -> Tuple[int, int]:
    """(beam_size, n_best) from the query string."""
    q = request.query_params

    def get_int(name, default):
      raw = q.get(name)
      if raw is None or raw == "":
        return default
      try:
        return int(raw)
      except ValueError:
        raise ServeError(400, "bad_parameter", f"{name}={raw!r}: not an integer") from None
    beam = get_int("beam_size", self.default_beam)
    if beam not in self.batcher.beam_sizes:
      raise ServeError(400, "bad_parameter",
                       f"beam_size={beam}: must be between 1 and {max(self.batcher.beam_sizes)} "
                       "(the server's --max_beam_size)")
    n_best = get_int("n_best", 1)
    if not 1 <= n_best <= beam:
      raise ServeError(400, "bad_parameter", f"n_best={n_best}: must be between 1 and "
                       f"beam_size={beam}")
    return beam, n_best

  # ---- bodies

  def _remaining(self, deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())

  async def _read_body(self, request, deadline: float) -> bytes:
    """The body, at most max_bytes (413 beyond; 408 when the upload outlasts the timeout)."""
    limit = self.limits.max_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
      try:
        declared = int(declared)
      except ValueError:
        raise ServeError(400, "bad_request", f"Content-Length: {declared!r} is not a number") from None
    too_large = ServeError(413, "body_too_large",
                           f"request body over the limit of {limit} bytes (--max_bytes)")

    async def read():
      if declared is not None and declared > limit:
        await self._drain(request, declared)
        raise too_large
      chunks, n = [], 0
      async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
          await self._drain(request, declared or 0)
          raise too_large
        chunks.append(chunk)
      return b"".join(chunks)
    try:
      return await asyncio.wait_for(read(), self._remaining(deadline))
    except asyncio.TimeoutError:
      raise ServeError(408, "timeout", f"the request body did not arrive within "
                       f"{self.limits.timeout_s:g}s (--timeout_s)") from None
    except ClientDisconnect:
      raise ServeError(400, "client_disconnected", "the client went away mid-request") from None

  async def _drain(self, request, declared: int) -> None:
    """Reads and drops the rest of a body that is a little too large, so that the
    client can read the 413 (closing while it sends makes it see a reset)."""
    if declared > 4 * self.limits.max_bytes + 2**20:
      return  # far too large: answer at once
    n = 0
    async for chunk in request.stream():
      n += len(chunk)
      if n > 4 * self.limits.max_bytes + 2**20:
        return

  async def _form_files(self, request, body: bytes) -> List[Tuple[str, str, bytes]]:
    """multipart/form-data -> [(field, file name, bytes)] of its file parts, in order."""

    async def stream():
      yield body
      yield b""
    parser = MultiPartParser(request.headers, stream(), max_files=self.limits.max_images + 1,
                             max_fields=100, max_part_size=64 * 1024)
    try:
      form = await parser.parse()
    except MultiPartException as e:
      if "too many files" in e.message.lower():
        raise self._too_many() from None
      raise ServeError(400, "bad_multipart", f"malformed multipart/form-data ({e.message})") from None
    except Exception as e:  # pylint: disable=broad-except
      raise ServeError(400, "bad_multipart",
                       f"malformed multipart/form-data ({type(e).__name__}: {e})") from None
    files = []
    try:
      for field, value in form.multi_items():
        if isinstance(value, UploadFile):
          files.append((field, value.filename or "", await value.read()))
    finally:
      await form.close()
    return files

  def _too_many(self) -> ServeError:
    return ServeError(413, "too_many_images",
                      f"more than {self.limits.max_images} images in one request (--max_images)")

  # ---- captioning

  def _decode(self, data: bytes) -> np.ndarray:
    image = images_lib.load_image(data, size=self.model.image_size,
                                  max_pixels=self.limits.max_pixels)
    return self.model.preprocess(image)

  def _image_error(self, e: Exception) -> ServeError:
    if isinstance(e, images_lib.ImageError):
      kind = getattr(e, "kind", "corrupt")
      msg = str(e)
      if kind == "too_large":
        msg = msg.split(" (")[0] + " (--max_pixels)"
      return ServeError(IMAGE_ERROR_STATUS.get(kind, 422), kind, msg)
    return ServeError(422, "corrupt", f"cannot decode image ({type(e).__name__})")

  async def _caption_all(self, datas: List[bytes], beam: int, deadline: float) -> list:
    """Decodes and captions images: per image a Batcher result or a ServeError."""
    loop = asyncio.get_running_loop()
    out: list = [None] * len(datas)
    tasks = {}
    for i, data in enumerate(datas):
      if not data:
        out[i] = ServeError(400, "empty", "empty image (no bytes)")
      else:
        tasks[i] = loop.run_in_executor(self._decoder, self._decode, data)
    try:
      decoded = await asyncio.wait_for(
          asyncio.gather(*tasks.values(), return_exceptions=True), self._remaining(deadline))
    except asyncio.TimeoutError:
      raise self._timeout() from None
    images = {}
    for i, d in zip(tasks, decoded):
      if isinstance(d, BaseException):
        out[i] = self._image_error(d)
      else:
        images[i] = d
    if images:
      try:
        futures = self.batcher.submit(list(images.values()), beam)
      except QueueFull:
        raise ServeError(503, "queue_full",
                         f"the server is busy ({self.batcher.max_queue} images queued); "
                         "retry shortly", {"Retry-After": "1"}) from None
      waits = [asyncio.wrap_future(f) for f in futures]
      try:
        results = await asyncio.wait_for(asyncio.gather(*waits), self._remaining(deadline))
      except asyncio.TimeoutError:
        for f in futures:
          f.cancel()
        raise self._timeout() from None
      for i, r in zip(images, results):
        out[i] = r
    return out

  def _timeout(self) -> ServeError:
    return ServeError(504, "timeout", f"not captioned within {self.limits.timeout_s:g}s "
                      "(--timeout_s)")

  def _result(self, r: dict, n_best: int) -> dict:
    """A Batcher result -> the response's fields for one image."""
    caps = r["captions"][:n_best]
    att = self.attention_info is not None

    def words(ws):
      return [{"word": w, "weights": [round(float(x), 5) for x in wt]} for w, wt in ws]
    out = {"caption": caps[0][0] if caps else "",
           "logprob": round(caps[0][1], 5) if caps else None,
           "n_best": [dict({"caption": c, "logprob": round(lp, 5)}, **(
               {"words": words(ws)} if att else {})) for c, lp, ws in caps]}
    if att:  # where each word of the best caption looked
      out["attention"] = dict(self.attention_info, words=words(caps[0][2]) if caps else [])
    return out

  def _model_summary(self, beam: int) -> dict:
    return {"checkpoint": self.model.workdir, "step": self.model.step, "beam_size": beam}

  async def caption(self, request):
    t0 = time.perf_counter()
    deadline = time.monotonic() + self.limits.timeout_s
    try:
      self._check_key(request)
      beam, n_best = self._options(request)
      self._check_ready()
      media = _media_type(request)
      if media == "multipart/form-data":
        files = await self._form_files(request, await self._read_body(request, deadline))
        named = [f for f in files if f[0] == "image"]
        if not named:
          fields = sorted({f[0] for f in files})
          raise ServeError(400, "bad_request", "no file field named 'image' in the form" + (
              f" (file fields: {', '.join(fields)})" if fields else ""))
        if len(named) > 1:
          raise ServeError(400, "bad_request", f"{len(named)} files in the 'image' field: one per "
                           "request here; send several to /v1/caption:batch")
        data = named[0][2]
      elif media.startswith("image/") or media in RAW_TYPES:
        data = await self._read_body(request, deadline)
      else:
        raise ServeError(415, "unsupported_media_type",
                         f"Content-Type {media or '(none)'!r}: send the image as the body with an "
                         "image/* type, or as multipart/form-data field 'image'")
      (r,) = await self._caption_all([data], beam, deadline)
      if isinstance(r, ServeError):
        raise r
      out = self._result(r, n_best)
      out["model"] = self._model_summary(beam)
      out["ms"] = round((time.perf_counter() - t0) * 1000, 1)
      return _json(out)
    except ServeError as e:
      return self.error(e)

  async def caption_batch(self, request):
    t0 = time.perf_counter()
    deadline = time.monotonic() + self.limits.timeout_s
    try:
      self._check_key(request)
      beam, n_best = self._options(request)
      self._check_ready()
      media = _media_type(request)
      if media != "multipart/form-data":
        raise ServeError(415, "unsupported_media_type",
                         f"Content-Type {media or '(none)'!r}: send the images as "
                         "multipart/form-data file parts")
      files = await self._form_files(request, await self._read_body(request, deadline))
      if not files:
        raise ServeError(400, "bad_request", "no file parts in the form")
      if len(files) > self.limits.max_images:
        raise self._too_many()
      results = await self._caption_all([f[2] for f in files], beam, deadline)
      out = []
      for i, ((_, name, _), r) in enumerate(zip(files, results)):
        if isinstance(r, ServeError):
          self.metrics.errors.labels(r.kind).inc()
          out.append({"index": i, "file_name": name, "status": r.status,
                      "error": {"kind": r.kind, "message": r.message}})
        else:
          out.append({"index": i, "file_name": name, "status": 200, **self._result(r, n_best)})
      return _json({"results": out, "model": self._model_summary(beam),
                    "ms": round((time.perf_counter() - t0) * 1000, 1)})
    except ServeError as e:
      return self.error(e)

  # ---- the rest

  async def page(self, request):  # pylint: disable=unused-argument
    return HTMLResponse(self._page, headers={
        "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                   "style-src 'self' 'unsafe-inline'; "
                                   "script-src 'self' 'unsafe-inline'"})

  async def healthz(self, request):  # pylint: disable=unused-argument
    b = self.batcher
    if b.ready.is_set():
      return _json({"status": "ok", "programs": b.total, "warmup_s": round(b.warmup_s, 2)})
    if b.failed:
      return _json({"status": "failed", "error": b.failed}, 503)
    return _json({"status": "warming_up", "compiled": b.compiled, "programs": b.total}, 503,
                 {"Retry-After": "5"})

  async def model_info(self, request):
    try:
      self._check_key(request)
    except ServeError as e:
      return self.error(e)
    m, b = self.model, self.batcher
    return _json({
        "checkpoint": m.workdir, "step": m.step, "vocab_size": len(m.vocab),
        "image_size": m.image_size, "input_size": m.input_size, "max_length": m.max_length,
        "attention": self.attention_info, "beam_size": self.default_beam,
        "beam_sizes": list(b.beam_sizes), "batch_sizes": list(b.sizes),
        "max_wait_ms": round(b.max_wait_s * 1000, 3),
        "length_penalty": b.options.length_penalty, "min_length": b.options.min_length,
        "block_trigrams": b.options.block_trigrams, "bad_endings": list(b.options.bad_endings),
        "limits": dataclasses.asdict(self.limits), "ready": b.ready.is_set(),
        "config": m.config.to_dict()})

  async def metrics_text(self, request):
    try:
      self._check_key(request)
    except ServeError as e:
      return self.error(e)
    body, ctype = self.metrics.text()
    return Response(body, 200, headers={"Content-Type": ctype})


# ---------------------------------------------------------------- command


def decode_options(args, config) -> decode.DecodeOptions:
  """The decoding of every request (its beam size aside): length_penalty and
  bad_endings default to the training config's. ValueError names a bad flag."""
  lp = args.length_penalty
  if lp is None:
    lp = float(config.get("length_penalty", 0.0))
  bad = args.bad_endings
  if bad is None:
    bad = config.get("bad_endings", ",".join(decode.BAD_ENDINGS))
  try:
    return decode.DecodeOptions(length_penalty=lp, min_length=args.min_length,
                                block_trigrams=args.block_trigrams, bad_endings=bad)
  except ValueError as e:
    raise ValueError(f"--{e}") from None


def build(args, model=None) -> Server:
  """The server for parsed flags (the model loaded from --checkpoint unless given)."""
  if model is None:
    model = inference.load_workdir(args.checkpoint, args.step)
  if args.max_beam_size < 1:
    raise ValueError(f"--max_beam_size={args.max_beam_size}: must be >= 1")
  if not 1 <= args.beam_size <= args.max_beam_size:
    raise ValueError(f"--beam_size={args.beam_size}: must be between 1 and "
                     f"--max_beam_size={args.max_beam_size}")
  if args.max_batch < 1:
    raise ValueError(f"--max_batch={args.max_batch}: must be >= 1")
  if args.max_wait_ms < 0:
    raise ValueError(f"--max_wait_ms={args.max_wait_ms}: must be >= 0")
  if args.workers < 1 or args.compile_threads < 1:
    raise ValueError(f"--workers={args.workers}, --compile_threads={args.compile_threads}: "
                     "must be >= 1")
  limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels,
                  max_images=args.max_images, max_queue=args.max_queue, timeout_s=args.timeout_s)
  limits.check()
  metrics = Metrics()
  metrics.listen_to_jax()
  batcher = Batcher(model, range(1, args.max_beam_size + 1), batch_sizes(args.max_batch),
                    decode_options(args, model.config),
                    args.max_wait_ms / 1000.0, limits.max_queue, metrics,
                    attention=not args.no_attention)
  api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, "")
  return Server(model, batcher, limits, args.beam_size, api_key=api_key, workers=args.workers,
                metrics=metrics, compile_threads=args.compile_threads)


def listen(host: str, port: int) -> socket.socket:
  """A listening TCP socket on host:port; OSError (naming the address) when it cannot be had."""
  try:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
  except OSError as e:
    raise OSError(f"--host={host}: {e.strerror or e}") from None
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(1024)
  except OSError as e:
    sock.close()
    raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
  sock.set_inheritable(True)
  return sock


def run(args) -> int:
  # The address first: a busy port fails at once, not after loading and compiling.
  try:
    sock = listen(args.host, args.port)
    server = build(args)
  except (inference.CheckpointError, ValueError, OSError) as e:
    print(f"captionjax serve: error: {e}", file=sys.stderr)
    return 2
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s captionjax serve %(levelname)s: %(message)s"))
  log.addHandler(handler)
  log.propagate = False
  log.setLevel(args.log_level.upper())
  m = server.model
  log.info("model: %s step %d, %d words, %d px input, attention %s; compiling %d programs "
           "(/healthz turns 200 when done)", m.workdir, m.step, len(m.vocab), m.input_size,
           server.attention_info["grid"] if server.attention_info else "none",
           server.batcher.total)
  if args.host not in ("127.0.0.1", "localhost", "::1"):
    log.warning("listening on %s: reachable from other machines%s", args.host,
                "" if server.api_key else " without an API key (--api_key)")
  if server.api_key:
    log.info("API key required on /v1/* and /metrics")
  shown = f"[{args.host}]" if ":" in args.host else args.host
  log.info("listening on http://%s:%d/ (the page; the API under /v1/)", shown,
           sock.getsockname()[1])
  config = uvicorn.Config(server.app, host=args.host, port=args.port, log_level=args.log_level,
                          access_log=args.access_log, lifespan="on", timeout_keep_alive=5)
  try:
    uvicorn.Server(config).run(sockets=[sock])
  except KeyboardInterrupt:
    pass
  finally:
    sock.close()
  return 0
