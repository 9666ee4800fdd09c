"""Benchmark: start-up costs of the public API, each in a new Python process.

    python experiments/benchmarks/bench_import.py --workdir=runs/default --image=photo.jpg \\
        [--python=PATH] [--repeats=5]

Times, per process, `import captionjax`, then `captionjax.load(workdir)`,
then the first `caption(image)` (compilation included) and a second one.
Baselines measured in the same run, also one process each: a process that
does nothing (start to exit), `import numpy`, `import jax`, `import tensorflow`. Each
figure is the median of `--repeats` processes after one warm-up process (the
file cache). `--python` picks the interpreter (e.g. a virtual env holding
only the built wheel); by default this one, with this checkout first on the
path.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

_API = """
import json, sys, time
t0 = time.perf_counter()
import captionjax
t1 = time.perf_counter()
heavy = sorted(m for m in ("jax", "tensorflow") if m in sys.modules)
model = captionjax.load(sys.argv[1])
t2 = time.perf_counter()
text = model.caption(sys.argv[2])[0].text
t3 = time.perf_counter()
model.caption(sys.argv[2])
t4 = time.perf_counter()
print(json.dumps({"import captionjax": t1 - t0, "captionjax.load": t2 - t1,
                  "first caption (compile)": t3 - t2, "second caption": t4 - t3,
                  "heavy_after_import": heavy, "caption": text,
                  "tensorflow_after_caption": "tensorflow" in sys.modules}))
"""

_BASELINE = """
import json, sys, time
t0 = time.perf_counter()
exec(sys.argv[1])
print(json.dumps({"t": time.perf_counter() - t0}))
"""


def _run(python, code, *args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  if python == sys.executable:
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  else:
    env.pop("PYTHONPATH", None)
  t0 = __import__("time").perf_counter()
  out = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env,
                       check=True)
  wall = __import__("time").perf_counter() - t0
  return json.loads(out.stdout.strip().splitlines()[-1]), wall


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a `captionjax train` workdir")
  p.add_argument("--image", required=True, help="an image file to caption")
  p.add_argument("--python", default=sys.executable, help="the interpreter to measure")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  workdir, image = os.path.abspath(args.workdir), os.path.abspath(args.image)
  rows, first = {}, None
  for i in range(args.repeats + 1):
    rec, wall = _run(args.python, _API, workdir, image)
    if i == 0:
      first = rec
      continue
    for k, v in rec.items():
      if isinstance(v, float):
        rows.setdefault(k, []).append(v)
    rows.setdefault("process, start to exit", []).append(wall)
  for name, stmt in [("python -c pass, process", "pass"), ("import numpy", "import numpy"),
                     ("import jax", "import jax"), ("import tensorflow", "import tensorflow")]:
    for i in range(args.repeats + 1):
      rec, wall = _run(args.python, _BASELINE, stmt)
      if i:
        rows.setdefault(name, []).append(wall if stmt == "pass" else rec["t"])
  med = {k: round(statistics.median(v), 3) for k, v in rows.items()}
  for k, v in med.items():
    print(f"{k:28s} {v:8.3f} s  (median of {len(rows[k])})")
  print(json.dumps({"python": args.python, "medians_s": med, "caption": first["caption"],
                    "heavy_after_import": first["heavy_after_import"],
                    "tensorflow_after_caption": first["tensorflow_after_caption"],
                    "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
  main()
