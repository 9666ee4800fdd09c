"""`captionjax train`'s command line: flags, config overrides, exit statuses.

    captionjax train --workdir=runs/default [--config=NAME_OR_FILE] [--config.FIELD=VALUE ...]

The training itself is captionjax/train.py (`train_and_evaluate`). Exit
status: 0 done, 1 a one-line error (diverged, workdir, data, config values,
checkpoints), 2 usage, 128 + signal when SIGTERM/SIGINT stopped the run.
"""

import sys

from captionjax import checkpoints as ckpt_lib
from captionjax import cli
from captionjax import configs

ALLOW_EXTRA_ARGS = True  # --config.FIELD=VALUE overrides


def add_arguments(p):
  p.add_argument("--workdir", required=True,
                 help="checkpoints, logs and results; an existing run there is resumed")
  p.add_argument("--config", default="default",
                 help="a config name in captionjax/configs or a config file path")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.add_argument("--start_from", default="",
                 help="initialize the model from another run's latest checkpoint "
                      "(NeuralTalk2's -start_from), e.g. to go on with CNN fine-tuning")


def run(args) -> int:
  from captionjax import monitor  # pylint: disable=g-import-not-at-top
  from captionjax import train  # pylint: disable=g-import-not-at-top
  error = lambda msg: print(f"captionjax train: error: {msg}", file=sys.stderr, flush=True)
  bad = [item for item in args.extra if not item.startswith("--config.")]
  if bad:
    error(f"unrecognized argument {bad[0]}")
    return 2
  try:
    config = configs.load_config(args.config, [item[len("--config."):] for item in args.extra])
  except configs.ConfigError as e:
    error(e)
    return 2
  try:
    train.train_and_evaluate(config, args.workdir, progress=not args.no_progress,
                             start_from=args.start_from or None)
  except ckpt_lib.Preempted as e:
    print(f"captionjax train: {e}", file=sys.stderr, flush=True)
    return 128 + e.signum
  # A diverged loss, an unwritable or full workdir, missing files, bad config
  # values, incompatible checkpoints, bad data: one line, no traceback.
  except (monitor.Diverged, OSError, ValueError) as e:
    error(cli.error_line(e, args.workdir))
    return 1
  return 0
