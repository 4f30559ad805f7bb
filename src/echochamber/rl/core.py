"""The shared RL core in one namespace (``from echochamber.rl import core``), for tests and interactive use.

The library imports the modules themselves: ``losses`` (masked reductions, KL estimators, loss
aggregation, clipped losses, whitening), ``experience`` (``Experience``, minibatches, the annotation
pass), ``scoring`` (verdicts and task rewards), ``tables`` (the logged columns and the parquet writer)
and ``trainer`` (``Accel``, ``PolicyGradientTrainer``, ``make_optimizer``, ``checkpoint_steps``).
"""

from echochamber.rl.experience import (
    Experience,
    annotate,
    last_token_index,
    micro_batches,
    minibatches,
    policy_logits,
    token_entropy,
)
from echochamber.rl.losses import (
    LOSS_AGGREGATIONS,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    kl_estimate,
    masked_mean,
    masked_sum,
    whiten,
)
from echochamber.rl.scoring import Scored, default_scorer, score, task_rewards
from echochamber.rl.tables import SAMPLE_COLUMNS, STEP_COLUMNS, format_stats, rollout_row, write_table
from echochamber.rl.trainer import Accel, PolicyGradientTrainer, checkpoint_steps, make_optimizer
from echochamber.tensors import token_logprobs

__all__ = [
    "LOSS_AGGREGATIONS", "SAMPLE_COLUMNS", "STEP_COLUMNS", "Accel", "Experience", "PolicyGradientTrainer", "Scored",
    "aggregate", "annotate", "checkpoint_steps", "clipped_policy_loss", "clipped_value_loss", "default_scorer",
    "format_stats", "kl_estimate", "last_token_index", "make_optimizer", "masked_mean", "masked_sum",
    "micro_batches", "minibatches", "policy_logits", "rollout_row", "score", "task_rewards", "token_entropy",
    "token_logprobs", "whiten", "write_table",
]
