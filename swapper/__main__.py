"""``python -m swapper`` runs the same command line as ``swapper``."""

import sys

from swapper.cli import main

sys.exit(main())
