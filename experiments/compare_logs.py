"""Compares the training losses of two runs' train_log.jsonl, step by step.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 captionjax train --workdir=/tmp/four ...
    captionjax train --workdir=/tmp/one ...
    python experiments/compare_logs.py /tmp/one /tmp/four

Prints each logged step's losses and relative difference, the largest, and
the last; exits 1 when a step is logged in one run only or the largest
relative difference exceeds --rtol.
"""

import argparse
import sys

from captionjax import monitor


def losses(workdir: str) -> dict:
  """(phase, step) -> logged training loss."""
  return {(r.get("phase"), r["step"]): r["loss"] for r in monitor.read_log(workdir) if "loss" in r}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("reference")
  p.add_argument("other")
  p.add_argument("--rtol", type=float, default=1e-4)
  args = p.parse_args(argv)
  a, b = losses(args.reference), losses(args.other)
  if a.keys() != b.keys():
    print(f"steps logged in one run only: {sorted(a.keys() ^ b.keys())[:10]}")
    return 1
  worst = 0.0
  for key in sorted(a, key=lambda k: k[1]):
    rel = abs(a[key] - b[key]) / max(abs(a[key]), 1e-30)
    worst = max(worst, rel)
    print(f"{key[0]:>14} step {key[1]:>6}: {a[key]:.9g} {b[key]:.9g} relative {rel:.2e}")
  print(f"largest relative difference {worst:.2e} over {len(a)} logged steps "
        f"(bound {args.rtol:g}: {'within' if worst <= args.rtol else 'OVER'})")
  return 0 if worst <= args.rtol else 1


if __name__ == "__main__":
  sys.exit(main())
