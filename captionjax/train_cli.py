"""`captionjax train`'s command line: flags, config overrides, exit statuses.

    captionjax train --workdir=runs/default [--config=NAME_OR_FILE] [--config.FIELD=VALUE ...]

The training itself is captionjax/trainer.py (`train_and_evaluate`, through the
public `captionjax.train`). Exit
status (captionjax/cli.py): 0 done, 1 the run failed (diverged, a full disk),
2 bad flags, config, data or checkpoints (one line naming it), 128 + signal
when SIGTERM/SIGINT stopped the run (after a checkpoint).
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
                 help=f"a config name ({', '.join(configs.names())}) or a config file path")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  p.add_argument("--start_from", default="",
                 help="initialize the model from another run's latest checkpoint "
                      "(NeuralTalk2's -start_from), e.g. to go on with CNN fine-tuning")
  g = p.add_argument_group("several processes (one per host), README 'Many devices and hosts'")
  g.add_argument("--coordinator", default="", metavar="HOST:PORT",
                 help="process 0's address for JAX's distributed runtime")
  g.add_argument("--num_processes", type=int, default=0, help="processes in the run")
  g.add_argument("--process_id", type=int, default=-1, help="this process's index, 0..N-1")
  g.add_argument("--distributed", action="store_true",
                 help="start JAX's distributed runtime with what the cluster's environment "
                      "says (SLURM, Open MPI, a Cloud TPU slice)")
  p.epilog = ("Set any config field with --config.FIELD=VALUE (dotted when nested: "
              "--config.model.rnn_size=512); captionjax/configs/default.py explains each.")


def run(args) -> int:
  """Bad flags, config, data or checkpoints raise (one line, exit 2: cli.run_command),
  as do a diverged run and a full disk (exit 1)."""
  bad = [item for item in args.extra if not item.startswith("--config.")]
  if bad:
    raise configs.ConfigError(f"unrecognized argument {bad[0]} (config fields are set "
                              "with --config.FIELD=VALUE)")
  config = configs.load_config(args.config, [item[len("--config."):] for item in args.extra])
  from captionjax import api  # pylint: disable=g-import-not-at-top
  from captionjax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize(args.coordinator, args.num_processes, args.process_id, args.distributed)
  try:
    api.train(config, args.workdir, progress=not args.no_progress,
              start_from=args.start_from or None)
  except ckpt_lib.Preempted as e:
    print(f"captionjax train: {e}", file=sys.stderr, flush=True)
    return 128 + e.signum
  return cli.EXIT_OK
