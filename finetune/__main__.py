import sys

from hybridps.finetune.cli import main

sys.exit(main())
