"""``python -m scratchlm`` runs the command line."""

import sys

from scratchlm.cli import main

sys.exit(main())
