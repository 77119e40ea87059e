"""`python -m taxonomist` (also what `torchrun -m taxonomist` runs)."""

import sys

from .cli.main import main

sys.exit(main())
