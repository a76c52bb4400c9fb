"""Entry point of ``python -m pretrain`` and ``accelerate launch -m pretrain``."""
import sys

from pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
