"""``python -m hybridps``: the same as the ``hybridps`` command."""
import sys

from hybridps.cli import main

if __name__ == "__main__":
    sys.exit(main())
