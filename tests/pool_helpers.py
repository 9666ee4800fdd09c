"""Worker functions for the tests that kill pool workers.

The pool's workers are spawned processes: they import the function they run
by name, so it lives in a module that both the tests and the workers can
import (pytest puts tests/ on sys.path; spawned workers get the same path).
"""

import os
import signal

from captionjax.prepro import _process_image  # the real one, before any monkeypatch


def _die():
  os.kill(os.getpid(), signal.SIGKILL)  # what the OS's out-of-memory killer sends


def _first_time(marker: str) -> bool:
  """True once per marker file (across processes): it creates the file."""
  try:
    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    return True
  except FileExistsError:
    return False


def square_or_die(job):
  """x -> x * x; ("kill", x) kills its worker, ("kill_once", x, marker) only the
  first time, ("raise", x) raises ValueError."""
  if isinstance(job, tuple):
    kind, x = job[:2]
    if kind == "kill" or (kind == "kill_once" and _first_time(job[2])):
      _die()
    if kind == "raise":
      raise ValueError(f"bad job {x}")
    job = x
  return job * job


def decode_or_die(job):
  """prepro's pass-1 worker, except that an image whose name holds "poison"
  kills its worker every time, and one whose name holds "flaky" the first
  time only (a marker file beside it remembers)."""
  source = job[1]
  if isinstance(source, str):
    if "poison" in source or ("flaky" in source and _first_time(source + ".killed")):
      _die()
  return _process_image(job)
