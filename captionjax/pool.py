"""A process pool that notices when the OS kills one of its workers.

`imap(fn, jobs, num_workers)` yields `fn(job)` for every job, in the jobs'
order, computed in `num_workers` spawned processes (prepro decodes its images
this way). `multiprocessing.Pool` waits forever when a worker is killed (the
OS's out-of-memory killer sends SIGKILL): the job is never answered. Here the
parent watches every worker's process as well as its pipe, and each worker
holds one job at a time, so the job a dead worker was running is known
exactly. It is retried once in a fresh worker (`retries`); when that worker
dies too, a `Died` comes back in the job's place and the other jobs go on.

A worker that dies before it is ready (its imports failed) is not blamed on a
job: the pool starts another, and raises `PoolError` after three such deaths
in a row rather than loop.
"""

import dataclasses
import multiprocessing
import multiprocessing.connection
import pickle
import signal
from typing import Callable, Iterable, Iterator

_READY = "ready"
_START_FAILURES = 3  # workers that die before they are ready, in a row, before giving up


class PoolError(OSError):
  """The pool cannot run: its workers die as they start."""


@dataclasses.dataclass(frozen=True)
class Died:
  """Yielded in place of a job's result: its worker died `deaths` times."""
  exitcode: int  # the last worker's exit status (negative: killed by that signal)
  deaths: int


def describe_exit(exitcode: int | None) -> str:
  """A worker's exit status in words: "was killed by SIGKILL, ..."."""
  if exitcode is None:
    return "was lost (its pipe closed)"
  if exitcode < 0:
    try:
      name = signal.Signals(-exitcode).name
    except ValueError:
      name = f"signal {-exitcode}"
    if -exitcode == getattr(signal, "SIGKILL", 9):
      return f"was killed by {name}, as the OS does when memory runs out"
    return f"was killed by {name}"
  return f"ended with exit status {exitcode}"


def _worker_main(fn, conn):
  """A worker: answers each (index, job) with (index, ok, fn(job) or the error)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
  conn.send(_READY)
  while True:
    try:
      msg = conn.recv()
    except EOFError:
      return
    if msg is None:
      return
    index, job = msg
    try:
      reply = (index, True, fn(job))
    except Exception as e:  # pylint: disable=broad-except
      reply = (index, False, e)
    try:
      conn.send(reply)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
      conn.send((index, False, RuntimeError(f"{type(e).__name__}: {e}")))


class _Worker:
  """One process, its pipe, and the task it holds: (index, job, deaths) or None.

  A task given before the process is ready is sent when it says so.
  """

  def __init__(self, ctx, fn, task=None):
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_worker_main, args=(fn, child), daemon=True)
    self.proc.start()
    child.close()
    self.ready = False
    self.task = task

  def give(self, task):
    self.task = task
    if self.ready:
      self.conn.send(task[:2])

  def became_ready(self):
    self.ready = True
    if self.task is not None:
      self.conn.send(self.task[:2])

  def receive(self):
    """The next message, or None when the pipe is closed or the message cut short."""
    try:
      return self.conn.recv() if self.conn.poll() else None
    except (EOFError, OSError, pickle.UnpicklingError):
      return None

  def stop(self):
    if self.proc.is_alive():
      self.proc.terminate()
    self.proc.join()
    self.conn.close()


def imap(fn: Callable, jobs: Iterable, num_workers: int, *, retries: int = 1,
         on_death: Callable[[int, object, Died, bool], None] | None = None,
         window: int | None = None) -> Iterator:
  """Yields `fn(job)` (or a `Died`) for every job, in order.

  Args:
    fn: a module-level function (the workers are spawned: it is pickled by name).
    jobs: the jobs, read as workers need them.
    num_workers: processes.
    retries: how many times a job whose worker died is run again, each time
      in a fresh worker.
    on_death: called as `on_death(index, job, Died(...), retrying)` when a
      worker dies holding a job.
    window: at most this many jobs are taken ahead of the first one not yet
      yielded (bounds the results held for reordering).

  Raises:
    PoolError: workers die before they are ready, three in a row.
    Exception: whatever `fn` raised, as `multiprocessing.Pool.imap` does.
  """
  ctx = multiprocessing.get_context("spawn")
  window = window or 32 * num_workers
  jobs = enumerate(jobs)
  done = {}  # index -> result, waiting for its turn
  next_out = taken = start_failures = 0
  exhausted = False
  workers = [_Worker(ctx, fn) for _ in range(num_workers)]
  try:
    while True:
      while next_out in done:
        yield done.pop(next_out)
        next_out += 1
      for w in workers:  # a new job for every ready, idle worker
        if w.ready and w.task is None and not exhausted and taken < next_out + window:
          item = next(jobs, None)
          exhausted = item is None
          if item is not None:
            w.give((*item, 0))
            taken += 1
      if exhausted and next_out == taken:
        return
      ready = set(multiprocessing.connection.wait(
          [w.conn for w in workers] + [w.proc.sentinel for w in workers]))
      for i, w in enumerate(workers):
        if w.conn not in ready and w.proc.sentinel not in ready:
          continue
        msg = w.receive()
        if msg == _READY:
          w.became_ready()
          start_failures = 0
        elif msg is not None:
          index, ok, value = msg
          if not ok:
            raise value
          done[index], w.task = value, None
        elif w.proc.sentinel in ready or not w.proc.is_alive():
          w.stop()
          start_failures = 0 if w.ready else start_failures + 1
          if start_failures >= _START_FAILURES:
            raise PoolError(f"worker processes die as they start "
                            f"(the last one {describe_exit(w.proc.exitcode)})")
          workers[i] = _Worker(ctx, fn, _after_death(w, retries, on_death, done))
  finally:
    for w in workers:
      w.stop()


def _after_death(dead: _Worker, retries: int, on_death, done: dict):
  """The task a dead worker held, to run again in a fresh worker, or None.

  A worker that died before it was ready never ran its task: it goes on as
  it was. Otherwise the death counts against the task, which is given up
  after `retries` retries: a `Died` stands in for its result.
  """
  if dead.task is None or not dead.ready:
    return dead.task
  index, job, deaths = dead.task
  deaths += 1
  died = Died(dead.proc.exitcode, deaths)
  retrying = deaths <= retries
  if on_death is not None:
    on_death(index, job, died, retrying)
  if retrying:
    return index, job, deaths
  done[index] = died
  return None
