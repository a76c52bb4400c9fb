import sys

from hybridps.checkpoints.cli import main

sys.exit(main())
