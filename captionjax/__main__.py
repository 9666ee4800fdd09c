"""`python -m captionjax`: the `captionjax` command."""

import sys

from captionjax.cli import main

sys.exit(main())
