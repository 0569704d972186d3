"""`python -m evaluation ...`: see evaluation/cli.py."""

import sys

from evaluation.cli import main

try:
    sys.exit(main())
except (ValueError, OSError) as err:  # a refused input (a missing model folder, a bad caption file): its message says what to do
    sys.exit(f"python -m evaluation: error: {err}")
