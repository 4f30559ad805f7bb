"""echo-chamber: does RL post-training amplify behaviours learned in pretraining?"""

__version__ = "0.1.0"
