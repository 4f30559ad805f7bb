"""Pretrain one cell (rule `pretrain`, run under `accelerate launch`); the logic is echochamber.pretrain."""
import sys

from echochamber.pretrain import main

sys.exit(main())
