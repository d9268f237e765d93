"""`python -m fastnft ...` (also what torchrun launches)."""

import sys

from fastnft.cli import main

sys.exit(main())
