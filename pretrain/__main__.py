"""Entry point of ``python -m hybridps.pretrain`` and ``accelerate launch -m hybridps.pretrain``."""
import sys

from hybridps.pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
