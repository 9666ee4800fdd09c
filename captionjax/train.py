"""`python -m captionjax.train --workdir=W [--config=C] [--config.FIELD=VALUE ...]`.

The same as `captionjax train` (flags: captionjax/train_cli.py; the training
loop: captionjax/trainer.py). Run it with `-m`; it is not meant to be
imported (the package's public `captionjax.train` is the function of
captionjax/api.py).
"""

if __name__ == "__main__":
  import sys
  from captionjax import cli
  sys.exit(cli.main(["train", *sys.argv[1:]]))
