"""RL-fine-tune one grid cell (rule `rl`); started by `accelerate launch`, so one copy runs per process."""
import sys

from echochamber.rl.train import main

sys.exit(main())
