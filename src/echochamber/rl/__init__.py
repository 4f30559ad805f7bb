"""RL post-training: a shared core (experience, KL, losses, logging) and thin PPO, GRPO and Expert Iteration.

- ``settings``: the paper's defaults, ``cell_spec`` (a rule's params) and ``Settings``;
- ``core``: KL estimators, loss aggregation, whitening, minibatches, cosine schedule, ``Experience``,
  ``PolicyGradientTrainer``, step/sample logging;
- ``ppo`` / ``grpo`` / ``ei``: the three algorithms; ``train``: one cell's job (``run`` / ``main``).
"""

from echochamber.rl.settings import DEFAULTS, Settings, cell_spec, check

__all__ = ["DEFAULTS", "Settings", "cell_spec", "check"]
