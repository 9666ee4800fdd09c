"""The `captionjax` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`run(args) -> int` (the exit status). Modules are imported only when their
subcommand runs, so `captionjax --help` stays fast (no JAX or TF import).
"""

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "prepro": ("captionjax.prepro", "preprocess a captioning data set into record shards"),
    "make-shapes": ("captionjax.shapes", "generate the embedded 'shapes' data set in raw format"),
    "train": ("captionjax.train_cli", "train a captioner (resumes from --workdir)"),
    "caption": ("captionjax.caption", "caption images with a trained checkpoint"),
    "evaluate": ("captionjax.metrics.cli", "score captions as the coco-caption toolkit does"),
    "perplexity": ("captionjax.perplexity", "perplexity of reference captions under a checkpoint"),
    "import-weights": ("captionjax.weights", "import pretrained VGG16 weights (Keras HDF5, torchvision)"),
    "features": ("captionjax.features", "VGG16 fc7 features of a folder of images (.npy + names)"),
}


def os_error_line(e: OSError, default_name: str) -> str:
  """One line for an OSError, naming its file (or `default_name` when it has none)."""
  import errno  # pylint: disable=g-import-not-at-top
  if e.filename is None and e.strerror is None:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  name = e.filename if e.filename is not None else default_name
  hint = " (free some space, or use another --workdir)" if e.errno == errno.ENOSPC else ""
  return f"{name}: {e.strerror or e}{hint}"


def error_line(e: Exception, default_name: str) -> str:
  """One line for a known error: its message's first line (OSErrors name their file)."""
  if isinstance(e, OSError):
    return os_error_line(e, default_name)
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="captionjax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module, help_) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(_module=module)
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  # Parse the command name first, then let its module add its own flags.
  if not argv or argv[0] not in SUBCOMMANDS:
    args = parser.parse_args(argv)  # prints help / errors for unknown names
    parser.print_help()
    return 2
  name = argv[0]
  module = importlib.import_module(SUBCOMMANDS[name][0])
  sub = argparse.ArgumentParser(
      prog=f"captionjax {name}", description=SUBCOMMANDS[name][1])
  module.add_arguments(sub)
  if getattr(module, "ALLOW_EXTRA_ARGS", False):
    args, extra = sub.parse_known_args(argv[1:])
    args.extra = extra
  else:
    args = sub.parse_args(argv[1:])
  return int(module.run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
