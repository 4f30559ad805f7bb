"""RL settings: the paper's values as defaults, the per-cell spec a rule passes, and config checks.

``cell_spec(config, cell)`` returns only the settings one RL cell uses (common keys that its algorithm
reads, plus that algorithm's own section, plus the cell's KL coefficient and seed), so editing GRPO
settings never reruns PPO cells. ``Settings.from_spec`` turns such a dict into typed settings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

from echochamber.config import ConfigError

# The paper's settings (PAPER.md); config.yaml overrides them for the CPU mini-study.
DEFAULTS: dict = {
    "prompts": {"source": "gsm8k", "split": "train", "max_prompts": None},
    "episodes": 10,
    "max_steps": None,
    "rollout_batch_size": 64,      # prompts per rollout step
    "samples_per_prompt": 8,
    "train_batch_size": 64,        # sequences per optimizer step
    "micro_batch_size": 16,        # sequences per forward/backward pass (gradient accumulation)
    "max_new_tokens": 1024,
    "temperature": 0.7,
    "top_p": 1.0,
    "actor_lr": 1.0e-6,
    "critic_lr": 7.0e-6,
    "warmup_ratio": 0.03,
    "min_lr_ratio": 0.1,
    "betas": [0.9, 0.95],
    "clip_eps": 0.2,
    "value_clip": 0.2,
    "grad_clip": 1.0,
    "reward_clip": [-10.0, 10.0],
    "gamma": 1.0,
    "lam": 0.95,
    "loss_agg": "microbatch_token_mean",   # the paper's packed runs (core.aggregate)
    "truncated": "score",
    "n_checkpoints": 15,
    "samples_logged": 64,
    "precision": "bf16",
    "compile": False,
    "processes": 1,
    "gpus": 0,
    "threads": 2,
    "save_every": 20,              # rollout steps between resume states (EI: every round); a runtime setting
    "ppo": {"epochs": 1, "kl_estimator": "k1", "whiten_advantages": True},
    "grpo": {"epochs": 1, "kl_estimator": "k3", "std_eps": 1.0e-9},
    "ei": {"rounds": 3, "samples_per_prompt": 64, "temperature": 1.0, "top_p": 0.95, "lr": 1.0e-4,
           "epochs": 2, "batch_size": 256, "from_base": True, "warmup_ratio": 0.03, "max_prompts": None},
}

# Common keys each algorithm reads (besides its own section); the rest never reach its params.
# (``threads``, ``save_every`` and ``gpus`` are not among them: the first two change speed and how much a
# killed job loses, not its numbers; ``gpus`` sets ``processes``.)
_SHARED = ["prompts", "max_new_tokens", "truncated", "samples_logged", "precision", "compile",
           "processes", "micro_batch_size", "rollout_batch_size", "betas", "grad_clip",
           "min_lr_ratio"]
_POLICY_GRADIENT = ["episodes", "max_steps", "samples_per_prompt", "train_batch_size", "temperature", "top_p",
                    "actor_lr", "warmup_ratio", "clip_eps", "reward_clip", "loss_agg", "n_checkpoints"]
USES: dict[str, list[str]] = {
    "ppo": _SHARED + _POLICY_GRADIENT + ["critic_lr", "value_clip", "gamma", "lam"],
    "grpo": _SHARED + _POLICY_GRADIENT,
    "ei": _SHARED,
}


def merged(config: dict) -> dict:
    """The config's ``rl`` section over the defaults (algorithm sections merged key by key)."""
    rl = copy.deepcopy(DEFAULTS)
    for key, value in (config.get("rl") or {}).items():
        if key in ("ppo", "grpo", "ei", "prompts"):
            rl[key] = {**rl[key], **(value or {})}
        else:
            rl[key] = copy.deepcopy(value)
    if rl["gpus"]:  # one process per GPU
        rl["processes"] = rl["gpus"]
    return rl


def cell_spec(config: dict, cell) -> dict:
    """Everything one RL cell's job reads, and nothing else (the rule's params)."""
    rl = merged(config)
    spec = {key: rl[key] for key in USES[cell.algo]}
    spec["algo"] = cell.algo
    spec[cell.algo] = rl[cell.algo]
    spec["kl_coef"] = float(cell.kl)
    spec["seed"] = int(cell.seed)
    return spec


def check(config: dict, origin: str = "config") -> None:
    """Cross-field checks the schema cannot express; raise ConfigError with one sentence."""
    algos = config.get("grid", {}).get("algos") or {}
    if not algos:
        return
    rl = merged(config)
    if "ei" in algos and any(float(k) != 0 for k in algos["ei"]["kl"]):
        raise ConfigError(f"{origin}: grid.algos.ei.kl: Expert Iteration has no KL term, so its kl list "
                          f"must be [0], got {algos['ei']['kl']}")
    lo, hi = rl["reward_clip"]
    if lo > hi:
        raise ConfigError(f"{origin}: rl.reward_clip: the lower bound {lo} is above the upper bound {hi}")
    if "grpo" in algos and rl["samples_per_prompt"] < 2:
        raise ConfigError(f"{origin}: rl.samples_per_prompt: GRPO needs at least 2 samples per prompt "
                          f"to form a group, got {rl['samples_per_prompt']}")
    sequences = rl["rollout_batch_size"] * rl["samples_per_prompt"]
    if {"ppo", "grpo"} & set(algos) and sequences % rl["train_batch_size"]:
        raise ConfigError(f"{origin}: rl.train_batch_size: {rl['train_batch_size']} does not divide the "
                          f"{sequences} sequences of a rollout (rollout_batch_size x samples_per_prompt)")
    if {"ppo", "grpo"} & set(algos) and rl["train_batch_size"] % rl["processes"]:
        raise ConfigError(f"{origin}: rl.processes: {rl['processes']} processes cannot share "
                          f"train_batch_size {rl['train_batch_size']} sequences evenly")
    if rl["rollout_batch_size"] % rl["processes"]:
        raise ConfigError(f"{origin}: rl.processes: {rl['processes']} processes cannot share "
                          f"rollout_batch_size {rl['rollout_batch_size']} prompts evenly")


@dataclass
class PPOSettings:
    epochs: int = 1                    # passes over each rollout batch
    kl_estimator: str = "k1"           # per-token KL in the reward
    whiten_advantages: bool = True


@dataclass
class GRPOSettings:
    epochs: int = 1
    kl_estimator: str = "k3"           # KL as a loss term
    std_eps: float = 1e-9


@dataclass
class EISettings:
    rounds: int = 3
    samples_per_prompt: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    lr: float = 1e-4
    epochs: int = 2
    batch_size: int = 256
    from_base: bool = True             # each round fine-tunes the base model (paper), else online
    warmup_ratio: float = 0.03
    max_prompts: int | None = None     # prompts sampled each round (None: all of rl.prompts)


def _defaults(key):
    value = DEFAULTS[key]
    return field(default_factory=lambda: copy.deepcopy(value))


@dataclass
class Settings:
    """Typed settings of one RL job (missing keys take the paper's defaults)."""
    algo: str = "ppo"
    kl_coef: float = 0.0               # the cell's KL coefficient (its grid coordinate `kl`)
    seed: int = 0
    prompts: dict = _defaults("prompts")
    episodes: float = DEFAULTS["episodes"]
    max_steps: int | None = None
    rollout_batch_size: int = DEFAULTS["rollout_batch_size"]
    samples_per_prompt: int = DEFAULTS["samples_per_prompt"]
    train_batch_size: int = DEFAULTS["train_batch_size"]
    micro_batch_size: int = DEFAULTS["micro_batch_size"]
    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]
    actor_lr: float = DEFAULTS["actor_lr"]
    critic_lr: float = DEFAULTS["critic_lr"]
    warmup_ratio: float = DEFAULTS["warmup_ratio"]
    min_lr_ratio: float = DEFAULTS["min_lr_ratio"]
    betas: list = _defaults("betas")
    clip_eps: float = DEFAULTS["clip_eps"]
    value_clip: float = DEFAULTS["value_clip"]
    grad_clip: float = DEFAULTS["grad_clip"]
    reward_clip: list = _defaults("reward_clip")
    gamma: float = DEFAULTS["gamma"]
    lam: float = DEFAULTS["lam"]
    loss_agg: str = DEFAULTS["loss_agg"]
    truncated: str = DEFAULTS["truncated"]
    n_checkpoints: int = DEFAULTS["n_checkpoints"]
    samples_logged: int = DEFAULTS["samples_logged"]
    precision: str = DEFAULTS["precision"]
    compile: bool = DEFAULTS["compile"]
    processes: int = DEFAULTS["processes"]
    threads: int = DEFAULTS["threads"]
    ppo: PPOSettings = field(default_factory=PPOSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    ei: EISettings = field(default_factory=EISettings)

    @classmethod
    def from_spec(cls, spec: dict) -> Settings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(f"rl settings: unknown key {', '.join(map(repr, unknown))}")
        kw = dict(spec)
        for name, sub in (("ppo", PPOSettings), ("grpo", GRPOSettings), ("ei", EISettings)):
            if name in kw and isinstance(kw[name], dict):
                kw[name] = sub(**kw[name])
        if "prompts" in kw:
            kw["prompts"] = {**DEFAULTS["prompts"], **kw["prompts"]}
        return cls(**kw)
