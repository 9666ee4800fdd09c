"""The `captionjax` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int` (the exit status). Modules are imported only when their
subcommand runs, so `captionjax --help` stays fast (no JAX or TF import).

Exit statuses, the same for every subcommand: 0 done; 1 the job ran but
failed (some images could not be captioned, training diverged, the disk
filled up); 2 bad usage or bad input (flags, config, data, checkpoints,
files); 128 + N when stopped by signal N (130 for Ctrl-C, 143 for SIGTERM).
Known errors print one line, `captionjax: error: ...`, naming the file or
field; `--debug` (or CAPTIONJAX_DEBUG=1) shows the traceback instead.
"""

import argparse
import errno
import importlib
import os
import signal
import sys
import threading

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
DEBUG_ENV = "CAPTIONJAX_DEBUG"

# name -> (module, one-line help)
SUBCOMMANDS = {
    "prepro": ("captionjax.prepro", "preprocess a captioning data set into record shards"),
    "make-shapes": ("captionjax.shapes", "generate the embedded 'shapes' data set in raw format"),
    "train": ("captionjax.train_cli", "train a captioner or the ranking model (resumes from --workdir)"),
    "caption": ("captionjax.caption", "caption images with a trained checkpoint"),
    "rank": ("captionjax.rank", "image-sentence retrieval (R@K, queries, demo page) with a checkpoint"),
    "evaluate": ("captionjax.metrics.cli", "score captions as the coco-caption toolkit does"),
    "perplexity": ("captionjax.perplexity", "perplexity of reference captions under a checkpoint"),
    "import-weights": ("captionjax.weights", "import pretrained VGG16 weights (Keras HDF5, torchvision)"),
    "features": ("captionjax.features", "VGG16 fc7 features of a folder of images (.npy + names)"),
    "serve": ("captionjax.serve", "an HTTP captioning server with dynamic batching and a web page"),
}


def os_error_line(e: OSError, default_name: str) -> str:
  """One line for an OSError, naming its file (or `default_name` when it has none)."""
  if e.filename is None and e.strerror is None:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  name = e.filename if e.filename is not None else default_name
  hint = " (free some space, or use another --workdir)" if e.errno == errno.ENOSPC else ""
  return f"{name}: {e.strerror or e}{hint}" if name else f"{e.strerror or e}{hint}"


def error_line(e: Exception, default_name: str) -> str:
  """One line for a known error: its message's first line (OSErrors name their file)."""
  if isinstance(e, OSError):
    return os_error_line(e, default_name)
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def build_parser() -> argparse.ArgumentParser:
  from captionjax import __version__  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="captionjax", description=__doc__.splitlines()[0])
  parser.add_argument("--version", action="version", version=f"captionjax {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module, help_) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(_module=module)
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
  argv = [a for a in argv if a != "--debug"]
  parser = build_parser()
  # Parse the command name first, then let its module add its own flags.
  if not argv or argv[0] not in SUBCOMMANDS:
    parser.parse_args(argv)  # prints help / errors for unknown names
    parser.print_help()
    return EXIT_USAGE
  name = argv[0]
  module = importlib.import_module(SUBCOMMANDS[name][0])
  sub = argparse.ArgumentParser(prog=f"captionjax {name}", description=SUBCOMMANDS[name][1])
  module.add_arguments(sub)
  sub.formatter_class = DefaultsHelpFormatter
  sub.add_argument("--debug", action="store_true",
                   help=f"show the Python traceback of an error (also: {DEBUG_ENV}=1)")
  if getattr(module, "ALLOW_EXTRA_ARGS", False):
    args, extra = sub.parse_known_args(argv[1:])
    args.extra = extra
  else:
    args = sub.parse_args(argv[1:])
  return run_command(f"captionjax {name}", lambda: module.run(args), debug)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                            argparse.RawDescriptionHelpFormatter):
  """--help shows each flag's default, and descriptions and epilogs as written."""


# Set by run_command when the command failed with an error that leaves native
# threads behind (an exception with `exit_at_once`: a failed Orbax restore);
# `entry` then ends the process without the interpreter's shutdown.
_exit_at_once = False


def entry() -> None:
  """The `captionjax` command (console script, `python -m captionjax[.cli]`).

  After a failed checkpoint restore, TensorStore's outstanding reads still
  call back into Python while the interpreter shuts down, each printing a
  traceback ('Event loop is closed') that no hook can catch at that stage: the
  process then ends with os._exit once its output is flushed (nothing else
  had been done).
  """
  status = main()
  if _exit_at_once:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


def run_command(prog: str, fn, debug: bool = False) -> int:
  """fn() -> exit status, with known errors as one line (status 2) and Ctrl-C as 130.

  Output to a closed pipe or a full disk on stdout ends the command with one
  line and status 1 rather than a traceback.
  """
  real_stdout = sys.stdout
  sys.stdout = _Stdout(real_stdout)
  if not debug:
    sys.excepthook = _quiet_closed_loop(sys.excepthook)
    threading.excepthook = _quiet_closed_loop_thread(threading.excepthook)
    sys.unraisablehook = _quiet_closed_loop_unraisable(sys.unraisablehook)
  try:
    status = int(fn() or 0)
    sys.stdout.flush()  # a full disk on stdout shows here, not at exit
    return status
  except KeyboardInterrupt:
    if debug:
      raise
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED
  except StdoutError as e:
    _quiet_stdout(real_stdout)
    if e.errno != errno.EPIPE:  # a closed pipe (`| head`) is not worth a word
      print(f"{prog}: error: cannot write to standard output ({e.strerror or e})",
            file=sys.stderr, flush=True)
    return EXIT_FAILED
  except (OSError, ValueError, UnicodeError, KeyError, IndexError, TypeError,
          RuntimeError) as e:
    if debug or isinstance(e, RuntimeError) and not hasattr(e, "exit_status"):
      raise
    global _exit_at_once  # pylint: disable=global-statement
    _exit_at_once = getattr(e, "exit_at_once", False)
    known = isinstance(e, (OSError, ValueError)) or hasattr(e, "exit_status")
    print(f"{prog}: error: {error_line(e, '')}" + ("" if known else f" ({type(e).__name__}; "
          "run with --debug for the traceback)"), file=sys.stderr, flush=True)
    # A run that failed on its own (diverged, a full disk): 1; bad input: 2.
    return getattr(e, "exit_status", EXIT_FAILED if getattr(e, "errno", None) == errno.ENOSPC
                   else EXIT_USAGE)
  finally:
    sys.stdout = real_stdout


def _quiet_closed_loop(hook):
  """sys.excepthook without 'Event loop is closed': after a failed Orbax restore,
  TensorStore's outstanding reads still report to the closed loop, one traceback each."""
  def quiet(kind, value, tb):
    if kind is RuntimeError and str(value) == "Event loop is closed":
      return
    hook(kind, value, tb)
  return quiet


def _quiet_closed_loop_thread(hook):
  """threading.excepthook without 'Event loop is closed' (as _quiet_closed_loop)."""
  def quiet(args):
    if args.exc_type is RuntimeError and str(args.exc_value) == "Event loop is closed":
      return
    hook(args)
  return quiet


def _quiet_closed_loop_unraisable(hook):
  """sys.unraisablehook without 'Event loop is closed' (as _quiet_closed_loop):
  TensorStore's callbacks report through it."""
  def quiet(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    hook(unraisable)
  return quiet


class StdoutError(OSError):
  """Writing to standard output failed (a full disk, a closed pipe)."""


class _Stdout:
  """sys.stdout, whose write errors become StdoutError (told apart from file errors)."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text):
    try:
      return self._stream.write(text)
    except OSError as e:
      raise StdoutError(e.errno, e.strerror) from None

  def flush(self):
    try:
      self._stream.flush()
    except OSError as e:
      raise StdoutError(e.errno, e.strerror) from None

  def __getattr__(self, name):
    return getattr(self._stream, name)


def _quiet_stdout(stream) -> None:
  """Points stdout at /dev/null so that Python's exit-time flush does not fail again."""
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
  except (OSError, ValueError):
    pass


if __name__ == "__main__":
  entry()
