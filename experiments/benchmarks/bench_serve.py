"""Benchmark: `captionjax serve` under load, and a soak run with good and bad inputs.

    python experiments/benchmarks/bench_serve.py --checkpoint=runs/default \\
        [--images=DIR] [--clients=1,8,64] [--duration_s=10] [--repeats=3] [--soak_s=120]

Starts the server (a subprocess on a free port of 127.0.0.1; or --url=
http://127.0.0.1:PORT for one already running on this machine: no other host
is accepted), waits for /healthz, then:

  load   for each client count N: N threads, each with its own keep-alive
         connection, POST /v1/caption (the raw JPEG/PNG body) back to back for
         --duration_s; a 2 s warm-up, then --repeats runs, the median reported:
         requests/s, p50/p95/p99 latency (client side), errors, and the mean
         batch size (images per model call, from the server's /metrics).
         1 client is the same requests sent one at a time. With --unbatched,
         a second server with --max_batch=1 takes the largest N too: what
         dynamic batching buys.
  soak   --soak_clients clients for --soak_s send a mix of good images and bad
         inputs (not an image, truncated, empty, a decompression bomb, wrong
         content type, a body over --max_bytes, batch requests mixing good and
         bad files); the server's resident memory (/metrics) is sampled every
         5 s: it must stay flat.

Every loop is bounded in time and in count and stops by itself; nothing but
127.0.0.1 is contacted. The last line is one JSON object with every figure.
"""

import argparse
import collections
import glob
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LOCAL = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS = 200_000  # per run, all clients together: a hard stop besides the time


def _say(msg):
  print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- HTTP


class Client:
  """One keep-alive connection to the local server."""

  def __init__(self, host, port):
    self.host, self.port = host, port
    self.conn = None

  def request(self, method, path, body=None, headers=None):
    """-> (status, body bytes); status -1 on a connection error."""
    for attempt in range(2):
      if self.conn is None:
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
      try:
        self.conn.request(method, path, body=body, headers=headers or {})
        r = self.conn.getresponse()
        data = r.read()
        if r.will_close:
          self.conn.close()
          self.conn = None
        return r.status, data
      except (OSError, http.client.HTTPException):
        self.conn.close()
        self.conn = None
        if attempt:
          return -1, b""
    return -1, b""

  def close(self):
    if self.conn is not None:
      self.conn.close()


def metrics(host, port) -> dict:
  """/metrics as {name{labels}: value}."""
  status, data = Client(host, port).request("GET", "/metrics")
  assert status == 200, status
  out = {}
  for line in data.decode().splitlines():
    if line and not line.startswith("#"):
      key, value = line.rsplit(" ", 1)
      out[key] = float(value)
  return out


# ---------------------------------------------------------------- inputs


def load_images(folder: str, n: int):
  """[(bytes, content type, name)]: the folder's images, or n generated JPEG scenes."""
  if folder:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
      ext = os.path.splitext(path)[1].lower()
      ctype = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}.get(ext)
      if ctype:
        with open(path, "rb") as f:
          out.append((f.read(), ctype, os.path.basename(path)))
    if not out:
      raise SystemExit(f"--images={folder}: no .jpg/.png files")
    return out
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    im = Image.new("RGB", (320, 240), tuple(int(x) for x in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
      x, y, s = (int(v) for v in rng.integers([0, 0, 30], [260, 180, 80]))
      color = tuple(int(v) for v in rng.integers(0, 256, 3))
      (d.ellipse if rng.random() < 0.5 else d.rectangle)([x, y, x + s, y + s], fill=color)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    out.append((buf.getvalue(), "image/jpeg", f"scene{i}.jpg"))
  return out


def _multipart(parts):
  boundary = "bench-boundary-7f3a"
  out = io.BytesIO()
  for name, data in parts:
    out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
              f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode())
    out.write(data + b"\r\n")
  out.write(f"--{boundary}--\r\n".encode())
  return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _png_header(width, height):
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def soak_inputs(images, max_bytes):
  """[(label, path, body, content type, weight)]: the soak's mix of good and bad requests."""
  good = images[0][0]
  jpeg = next((d for d, c, _ in images if c == "image/jpeg"), good)
  batch, batch_type = _multipart([("a.jpg", good), ("b.txt", b"not an image"), ("c.jpg", b""),
                                  ("d.jpg", images[-1][0])])
  mix = [("good", "/v1/caption", None, None, 10),
         ("good, n_best=3 beam 3", "/v1/caption?beam_size=3&n_best=3", good, "image/jpeg", 2),
         ("not an image", "/v1/caption", b"hello, not an image" * 50, "image/png", 2),
         ("truncated JPEG", "/v1/caption", jpeg[:len(jpeg) // 2], "image/jpeg", 2),
         ("empty body", "/v1/caption", b"", "image/jpeg", 1),
         ("decompression bomb header", "/v1/caption", _png_header(40000, 40000), "image/png", 1),
         ("wrong content type", "/v1/caption", good, "text/plain", 1),
         ("batch: 2 good, 2 bad", "/v1/caption:batch", batch, batch_type, 2),
         ("body over --max_bytes", "/v1/caption", b"\xff\xd8\xff" + b"\0" * max_bytes,
          "image/jpeg", 0.2)]
  return mix


# ---------------------------------------------------------------- runs


def run_clients(host, port, n_clients, duration_s, make_request):
  """n_clients threads for duration_s; make_request(client_index, i) -> (path, body, type, label).
  Returns [(label, seconds, status)]."""
  deadline = time.perf_counter() + duration_s
  results = [[] for _ in range(n_clients)]
  count = [0]
  lock = threading.Lock()

  def loop(c):
    client = Client(host, port)
    i = 0
    try:
      while time.perf_counter() < deadline:
        with lock:
          if count[0] >= MAX_REQUESTS:
            return
          count[0] += 1
        path, body, ctype, label = make_request(c, i)
        i += 1
        t0 = time.perf_counter()
        status, _ = client.request("POST", path, body, {"Content-Type": ctype} if ctype else {})
        results[c].append((label, time.perf_counter() - t0, status))
    finally:
      client.close()

  threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in range(n_clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(duration_s + 180)
  return [r for rs in results for r in rs]


def load_run(host, port, images, n_clients, duration_s):
  def make(c, i):
    data, ctype, name = images[(c * 7 + i) % len(images)]
    return "/v1/caption", data, ctype, name
  m0 = metrics(host, port)
  t0 = time.perf_counter()
  res = run_clients(host, port, n_clients, duration_s, make)
  wall = time.perf_counter() - t0
  m1 = metrics(host, port)
  lat = np.array([s for _, s, st in res if st == 200]) * 1000
  calls = m1["captionjax_batch_images_count"] - m0["captionjax_batch_images_count"]
  imgs = m1["captionjax_batch_images_sum"] - m0["captionjax_batch_images_sum"]
  cpu = m1["process_cpu_seconds_total"] - m0["process_cpu_seconds_total"]
  ok = int(len(lat))
  return {"clients": n_clients, "requests": len(res), "ok": ok,
          "errors": len(res) - ok, "req_per_s": ok / wall,
          "p50_ms": float(np.percentile(lat, 50)) if ok else None,
          "p95_ms": float(np.percentile(lat, 95)) if ok else None,
          "p99_ms": float(np.percentile(lat, 99)) if ok else None,
          "mean_batch": imgs / calls if calls else None,
          "server_cpu_ms_per_request": 1000 * cpu / max(ok, 1)}


def load_test(host, port, images, clients, duration_s, repeats):
  rows = []
  for n in clients:
    load_run(host, port, images, n, 2.0)  # warm-up
    runs = [load_run(host, port, images, n, duration_s) for _ in range(repeats)]
    row = {k: (float(np.median([r[k] for r in runs])) if runs[0][k] is not None else None)
           for k in runs[0]}
    row["errors"] = int(sum(r["errors"] for r in runs))
    row["clients"] = n
    row["runs"] = repeats
    row["load_average"] = os.getloadavg()[0]
    rows.append(row)
    _say(f"{n:3d} clients: {row['req_per_s']:7.1f} req/s, p50 {row['p50_ms']:7.1f} ms, "
         f"p95 {row['p95_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} ms, mean batch "
         f"{row['mean_batch']:.2f}, errors {row['errors']}, load {row['load_average']:.1f}")
  return rows


def soak(host, port, images, n_clients, duration_s, max_bytes):
  mix = soak_inputs(images, max_bytes)
  weights = np.array([w for *_, w in mix], float)
  rng = np.random.default_rng(1)
  picks = rng.choice(len(mix), size=MAX_REQUESTS, p=weights / weights.sum())

  def make(c, i):
    label, path, body, ctype, _ = mix[picks[(c * 100_003 + i) % MAX_REQUESTS]]
    if body is None:
      body, ctype, _ = images[(c * 7 + i) % len(images)]
    return path, body, ctype, label

  def rss():
    return metrics(host, port)["process_resident_memory_bytes"] / 2**20
  samples = [(0.0, rss())]
  done = threading.Event()

  def sample():
    t0 = time.perf_counter()
    while not done.wait(5.0):
      samples.append((time.perf_counter() - t0, rss()))
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  res = run_clients(host, port, n_clients, duration_s, make)
  done.set()
  sampler.join(10)
  samples.append((duration_s, rss()))
  by = collections.defaultdict(collections.Counter)
  for label, _, status in res:
    by[label][status] += 1
  health, _ = Client(host, port).request("GET", "/healthz")
  mem = [m for _, m in samples]
  half = len(mem) // 2
  return {"clients": n_clients, "seconds": duration_s, "requests": len(res),
          "statuses": {k: dict(v) for k, v in by.items()},
          "rss_mib_before": mem[0], "rss_mib_after": mem[-1], "rss_mib_max": max(mem),
          "rss_mib_first_half_mean": float(np.mean(mem[:half] or mem)),
          "rss_mib_second_half_mean": float(np.mean(mem[half:])),
          "rss_samples": [(round(t, 1), round(m, 1)) for t, m in samples],
          "healthz_after": health, "server_errors_5xx": sum(
              n for v in by.values() for s, n in v.items() if s >= 500 or s < 0)}


# ---------------------------------------------------------------- the server


class Server:
  def __init__(self, checkpoint, flags, log_path):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.log = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
    cmd = [sys.executable, "-m", "captionjax.cli", "serve", f"--checkpoint={checkpoint}",
           "--host=127.0.0.1", f"--port={self.port}", *flags]
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    _say(f"started: {' '.join(cmd[2:])} (log {log_path})")

  def wait(self, timeout_s=1800):
    t0 = time.time()
    while time.time() - t0 < timeout_s:
      if self.proc.poll() is not None:
        raise SystemExit(f"the server exited with {self.proc.returncode}; see {self.log.name}")
      status, body = Client("127.0.0.1", self.port).request("GET", "/healthz")
      if status == 200:
        return json.loads(body)
      time.sleep(1)
    raise SystemExit("the server was not ready in time")

  def stop(self):
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", default="", help="a trained workdir (the server is started)")
  p.add_argument("--url", default="", help="a server already running on this machine instead")
  p.add_argument("--server_flags", default="", help="extra `captionjax serve` flags, space-separated")
  p.add_argument("--images", default="", help="a folder of .jpg/.png (default: generated scenes)")
  p.add_argument("--num_generated", type=int, default=48)
  p.add_argument("--clients", default="1,8,64")
  p.add_argument("--duration_s", type=float, default=10.0)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--unbatched", action="store_true",
                 help="also a --max_batch=1 server at the largest client count")
  p.add_argument("--soak_s", type=float, default=120.0, help="0: no soak run")
  p.add_argument("--soak_clients", type=int, default=8)
  p.add_argument("--max_bytes", type=int, default=16 * 2**20, help="the server's --max_bytes")
  p.add_argument("--log_dir", default="/tmp")
  args = p.parse_args()
  if bool(args.checkpoint) == bool(args.url):
    raise SystemExit("give --checkpoint (start a server) or --url (a local one)")
  images = load_images(args.images, args.num_generated)
  clients = [int(c) for c in args.clients.split(",") if c.strip()]  # "": the soak alone
  _say(f"{len(images)} images, {sum(len(d) for d, _, _ in images) / len(images) / 1024:.0f} KiB "
       "on average")
  out = {"images": len(images), "image_source": args.images or "generated 320x240 JPEG",
         "duration_s": args.duration_s, "repeats": args.repeats}
  servers = []
  try:
    if args.url:
      u = urllib.parse.urlsplit(args.url)
      if u.hostname not in LOCAL:
        raise SystemExit(f"--url={args.url}: only a server on this machine (127.0.0.1) is allowed")
      host, port = u.hostname, u.port
    else:
      flags = [f"--max_bytes={args.max_bytes}"] + args.server_flags.split()
      t0 = time.time()
      servers.append(Server(args.checkpoint, flags, os.path.join(args.log_dir, "bench_serve.log")))
      out["health"] = servers[0].wait()
      out["ready_after_s"] = round(time.time() - t0, 1)
      host, port = "127.0.0.1", servers[0].port
    out["load"] = load_test(host, port, images, clients, args.duration_s, args.repeats)
    if args.unbatched and args.checkpoint and clients:
      s = Server(args.checkpoint, [f"--max_bytes={args.max_bytes}", "--max_batch=1",
                                   "--max_beam_size=2"] + args.server_flags.split(),
                 os.path.join(args.log_dir, "bench_serve_unbatched.log"))
      servers.append(s)
      s.wait()
      _say("unbatched server (--max_batch=1):")
      out["unbatched"] = load_test("127.0.0.1", s.port, images, [max(clients)], args.duration_s,
                                   args.repeats)
      s.stop()
    if args.soak_s > 0:
      _say(f"soak: {args.soak_clients} clients, {args.soak_s:.0f} s, good and bad inputs")
      out["soak"] = soak(host, port, images, args.soak_clients, args.soak_s, args.max_bytes)
      s = out["soak"]
      _say(f"soak: {s['requests']} requests, RSS {s['rss_mib_before']:.1f} -> "
           f"{s['rss_mib_after']:.1f} MiB (max {s['rss_mib_max']:.1f}), 5xx {s['server_errors_5xx']}")
      for label, st in s["statuses"].items():
        _say(f"  {label:28s} {st}")
  finally:
    for s in servers:
      s.stop()
  print(json.dumps(out))


if __name__ == "__main__":
  main()
