"""``python -m pybilayer``: the same command line as ``pybilayer``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
