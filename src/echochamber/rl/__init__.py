"""RL post-training: a shared core (experience, KL, losses, logging) and thin PPO, GRPO and Expert Iteration.

- ``settings``: the paper's defaults, ``cell_spec`` (a rule's params) and ``Settings``;
- the shared core: ``losses`` (masked reductions, KL estimators, loss aggregation, clipped policy and
  value losses, whitening), ``experience`` (``Experience``, minibatches, the no-grad annotation pass),
  ``scoring`` (verdicts and task rewards), ``tables`` (the step/sample logs), ``trainer`` (``Accel``,
  ``PolicyGradientTrainer``, optimizer and cosine schedule, checkpoint steps); ``core`` re-exports them all;
- ``ppo`` / ``grpo`` / ``ei``: the three algorithms; ``train``: one cell's job (``run`` / ``main``).
"""

from echochamber.rl.settings import DEFAULTS, Settings, cell_spec, check

__all__ = ["DEFAULTS", "Settings", "cell_spec", "check"]
