"""``python -m equiforce`` runs the command line."""

import sys

from equiforce.cli import main

sys.exit(main())
