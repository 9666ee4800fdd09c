"""`python -m captionjax`: the `captionjax` command."""

from captionjax.cli import entry

entry()
