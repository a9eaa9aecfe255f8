"""`python -m kdkit` (and `torchrun -m kdkit`) runs the command line."""

import sys

from kdkit.cli import main

sys.exit(main())
