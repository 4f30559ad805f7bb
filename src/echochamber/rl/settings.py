"""RL settings: the per-cell spec a rule passes, the typed settings of one job, and config checks.

The settings themselves (types, the paper's values as defaults, ranges, help, identity or runtime, which
algorithms read each) are defined once in :class:`echochamber.settings.RL`.

``cell_spec(config, cell)`` returns only the identity settings one RL cell uses (the common keys that its
algorithm reads, plus that algorithm's own section, plus the cell's KL coefficient and seed), so editing
GRPO settings never reruns PPO cells and editing a runtime setting (threads, gpus, samples_logged) reruns
nothing. ``Settings.from_spec`` turns such a dict, with the runtime values the job gets as flags, into
typed settings.
"""

from __future__ import annotations

import pydantic

from echochamber import settings as ec_settings
from echochamber.config import ConfigError, explain

# The paper's settings (docs/paper.md), as plain values; config.yaml overrides them for the CPU mini-study.
DEFAULTS: dict = ec_settings.RL().model_dump()
# Common keys each algorithm reads (besides its own section); the rest never reach its params.
USES: dict[str, list[str]] = {algo: ec_settings.used_by(algo) for algo in ec_settings.ALGOS}


def merged(config: dict) -> ec_settings.RL:
    """The config's ``rl`` section over the defaults; with ``gpus`` set, one process per GPU."""
    rl = ec_settings.RL.model_validate(config.get("rl") or {})
    return rl.model_copy(update={"processes": rl.gpus}) if rl.gpus else rl


def cell_spec(config: dict, cell) -> dict:
    """The identity settings one RL cell's job reads, and nothing else (the rule's params)."""
    rl = merged(config)
    spec = {key: v for key, v in ec_settings.identity(rl).items() if key in USES[cell.algo]}
    spec["algo"] = cell.algo
    spec[cell.algo] = rl[cell.algo].model_dump()
    spec["kl_coef"] = float(cell.kl)
    spec["seed"] = int(cell.seed)
    return spec


def check(config: dict, origin: str = "config") -> None:
    """Cross-field checks the models cannot express; raise ConfigError with one sentence."""
    algos = config.get("grid", {}).get("algos") or {}
    if not algos:
        return
    rl = merged(config)
    if "ei" in algos and any(float(k) != 0 for k in algos["ei"]["kl"]):
        raise ConfigError(f"{origin}: grid.algos.ei.kl: Expert Iteration has no KL term, so its kl list "
                          f"must be [0], got {algos['ei']['kl']}")
    lo, hi = rl.reward_clip
    if lo > hi:
        raise ConfigError(f"{origin}: rl.reward_clip: the lower bound {lo} is above the upper bound {hi}")
    if "grpo" in algos and rl.samples_per_prompt < 2:
        raise ConfigError(f"{origin}: rl.samples_per_prompt: GRPO needs at least 2 samples per prompt "
                          f"to form a group, got {rl.samples_per_prompt}")
    sequences = rl.rollout_batch_size * rl.samples_per_prompt
    if {"ppo", "grpo"} & set(algos) and sequences % rl.train_batch_size:
        raise ConfigError(f"{origin}: rl.train_batch_size: {rl.train_batch_size} does not divide the "
                          f"{sequences} sequences of a rollout (rollout_batch_size x samples_per_prompt)")
    if {"ppo", "grpo"} & set(algos) and rl.train_batch_size % rl.processes:
        raise ConfigError(f"{origin}: rl.processes: {rl.processes} processes cannot share "
                          f"train_batch_size {rl.train_batch_size} sequences evenly")
    if rl.rollout_batch_size % rl.processes:
        raise ConfigError(f"{origin}: rl.processes: {rl.processes} processes cannot share "
                          f"rollout_batch_size {rl.rollout_batch_size} prompts evenly")




class Settings(ec_settings.RL):
    """Typed settings of one RL job: the ``rl`` section (missing keys take the paper's defaults) and the cell."""
    algo: str = "ppo"
    kl_coef: float = 0.0               # the cell's KL coefficient (its grid coordinate `kl`)
    seed: int = 0

    @classmethod
    def from_spec(cls, spec: dict) -> Settings:
        try:
            return cls.model_validate(spec)
        except pydantic.ValidationError as e:
            raise ConfigError(f"rl settings: {explain(e.errors(), cls, 'rl')}") from None
