"""``python -m proponent`` runs the command line."""

import sys

from proponent.cli import main

sys.exit(main())
