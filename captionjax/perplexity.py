"""`captionjax perplexity`: perplexity of reference captions under a checkpoint.

    captionjax perplexity --checkpoint=WORKDIR [--split=test] [--data=DIR]

As NeuralTalk reports it: exp of the mean per-token cross-entropy of every
reference caption of the split, the tokens being each caption's words and its
END (words beyond max_length cut and rare words UNK, as prepro encoded them).
--data is a `captionjax prepro` output directory; by default the data set the
checkpoint was trained on (the shapes set is regenerated if its cache is gone).
Prints one JSON object on stdout: {"perplexity", "cross_entropy", "tokens",
"captions", "images", "split", "step"}. Exit status 2 on bad input.
"""

import json
import sys

EXIT_USAGE = 2


def add_arguments(p):
  p.epilog = __doc__.split("\n", 1)[1]  # the usage lines, output format and exit statuses
  p.add_argument("--checkpoint", required=True, help="a `captionjax train` workdir")
  p.add_argument("--step", type=int, default=None, help="a checkpoint step instead of the latest")
  p.add_argument("--split", default="test", help="the split whose reference captions are scored")
  p.add_argument("--data", default="",
                 help="a prepro output directory (default: the checkpoint's training data set)")
  p.add_argument("--batch_size", type=int, default=50, help="images per jitted batch")
  p.add_argument("--num_images", type=int, default=-1, help="score the first N images (-1 = all)")


def run(args) -> int:
  from captionjax import inference  # pylint: disable=g-import-not-at-top
  from captionjax import input_pipeline  # pylint: disable=g-import-not-at-top
  say = lambda m: print(m, file=sys.stderr, flush=True)
  if args.batch_size < 1:
    say(f"captionjax perplexity: error: --batch_size={args.batch_size}: must be >= 1")
    return EXIT_USAGE
  try:
    model = inference.load_workdir(args.checkpoint, args.step)
    data_dir = args.data or input_pipeline.data_dir_for(model.config)
    data = input_pipeline.load_split(data_dir, args.split)
    limit = args.num_images if args.num_images > 0 else None
    out = inference.perplexity(model, data, batch_size=min(args.batch_size, len(data)),
                               limit=limit)
  except (inference.CheckpointError, FileNotFoundError, ValueError) as e:
    say(f"captionjax perplexity: error: {e}")
    return EXIT_USAGE
  out.update(split=args.split, step=model.step)
  print(json.dumps(out))
  return 0
