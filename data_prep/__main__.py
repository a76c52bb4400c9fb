"""``python -m hybridps.data_prep``: see :mod:`hybridps.data_prep.cli`."""
import sys

from hybridps.data_prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
