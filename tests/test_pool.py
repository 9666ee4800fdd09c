"""`captionjax.pool`: results in order, and a worker killed by the OS (SIGKILL,
as its out-of-memory killer sends) costs only the job it was running."""

import signal
import sys

import pytest

import pool_helpers
from captionjax import pool


@pytest.fixture(autouse=True)
def deadline():
  """A pool that hangs fails the test instead of the whole run."""
  def fail(*_):
    raise TimeoutError("the pool hung")
  old = signal.signal(signal.SIGALRM, fail)
  signal.alarm(120)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, old)


def test_results_come_in_order_through_a_small_window():
  # window=3: at most three jobs ahead of the first not yet yielded.
  got = list(pool.imap(pool_helpers.square_or_die, range(40), 2, window=3))
  assert got == [x * x for x in range(40)]


def test_a_killed_worker_costs_only_its_job(tmp_path):
  marker = str(tmp_path / "killed_once")
  jobs = [1, 2, ("kill", 3), 4, ("kill_once", 5, marker), 6, 7, 8]
  deaths = []
  got = list(pool.imap(pool_helpers.square_or_die, jobs, 2,
                       on_death=lambda i, job, died, retrying: deaths.append((i, retrying))))
  sigkill = -signal.SIGKILL
  assert got == [1, 4, pool.Died(sigkill, 2), 16, 25, 36, 49, 64]
  # Job 2 died, was retried once and died again; job 4 died once and then ran.
  assert sorted(deaths) == [(2, False), (2, True), (4, True)]
  assert "killed by SIGKILL" in pool.describe_exit(sigkill)
  assert "memory" in pool.describe_exit(sigkill)


def test_without_retries_a_death_is_final():
  got = list(pool.imap(pool_helpers.square_or_die, [("kill", 1), 2], 1, retries=0))
  assert got == [pool.Died(-signal.SIGKILL, 1), 4]


def test_an_exception_in_the_function_is_raised():
  with pytest.raises(ValueError, match="bad job 3"):
    list(pool.imap(pool_helpers.square_or_die, [1, 2, ("raise", 3), 4], 2))


def test_workers_that_cannot_start_raise_instead_of_looping(tmp_path, monkeypatch):
  # A function whose module the workers cannot import: each dies as it starts.
  (tmp_path / "vanishing_module.py").write_text("def f(x):\n  return x\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  import vanishing_module  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
  (tmp_path / "vanishing_module.py").unlink()
  with pytest.raises(pool.PoolError, match="die as they start.*exit status 1"):
    list(pool.imap(vanishing_module.f, range(4), 2))
