"""`python -m lmlab.cli`: the same app as the `lmlab` command (torchrun launches it this way)."""

import sys

from lmlab.cli import main

sys.exit(main())
