"""The grid: config -> cells, their ids and their hive-style paths.

Paths carry the coordinates (``mixture=M/scale=Z/...``) so DuckDB reads them straight from the path,
and each cell's id is the same string, so a cell is named the same way everywhere.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

ALGOS = ("ppo", "grpo", "ei")
SPLITS = ("train", "test", "hard")
# More jobs than this on one machine is rarely meant: hours at mini scale, weeks at paper scale.
LOCAL_JOBS = 500


def block_params(scale: dict) -> int:
    """Parameters in a scale's transformer blocks (attention 4 d^2 + SwiGLU 3 d h per layer)."""
    d, h = int(scale["d_model"]), int(scale["mlp_hidden"])
    return int(scale["n_layers"]) * (4 * d * d + 3 * d * h)


def scales_by_size(config: dict) -> list[str]:
    """The grid's scales, smallest first (by parameters in the blocks, then name): the order in which
    findings and figures compare scales, whatever the scales are called."""
    return _by_size(config, values(config, "scales"))


def pretrain_priority(config: dict, scale: str) -> int:
    """Snakemake priority of a pretraining job: 1 + the scale's rank by size among config.scales, so the
    largest (longest) runs start first and the short ones fill both cores at the end, instead of a large
    run starting last and ending the study with one core busy. Above RL and evaluation jobs (priority 0)."""
    return 1 + _by_size(config, config["scales"]).index(scale)


def _by_size(config: dict, scales) -> list[str]:
    return sorted(scales, key=lambda z: (block_params(config["scales"][z]), str(z)))


def kl_str(kl: float) -> str:
    """One spelling per KL coefficient: 0, 0.001, 0.01 (used in paths and wildcards)."""
    return f"{float(kl):g}"


@dataclass(frozen=True)
class PretrainCell:
    mixture: str
    scale: str
    seed: int

    @property
    def id(self) -> str:
        return f"mixture={self.mixture}/scale={self.scale}/seed={self.seed}"


@dataclass(frozen=True)
class RLCell:
    mixture: str
    scale: str
    algo: str
    kl: float
    seed: int

    @property
    def id(self) -> str:
        return (f"mixture={self.mixture}/scale={self.scale}/algo={self.algo}/"
                f"kl={kl_str(self.kl)}/seed={self.seed}")

    @property
    def base(self) -> PretrainCell:
        return PretrainCell(self.mixture, self.scale, self.seed)

    def as_dict(self) -> dict:
        return asdict(self)


def _excluded(cell: dict, rules: list[dict]) -> bool:
    def matches(rule):
        return all(k in cell and (float(cell[k]) == float(v) if k == "kl" else cell[k] == v)
                   for k, v in rule.items())
    return any(matches(r) for r in rules)


BLOCK_KEYS = ("mixtures", "scales", "seeds", "algos")


def blocks(config: dict) -> list[dict]:
    """The grid as products of cells: the main one, then each of ``grid.also`` with the keys it leaves out
    taken from the main one."""
    g = config["grid"]
    main = {"mixtures": g["mixtures"], "scales": g["scales"], "seeds": g["seeds"], "algos": g.get("algos") or {}}
    return [main] + [{**main, **{k: v for k, v in b.items() if k in BLOCK_KEYS and v is not None}}
                     for b in g.get("also") or []]


def values(config: dict, key: str) -> list:
    """The mixtures, scales or seeds of every block, each once, in the order they first appear."""
    return list(dict.fromkeys(v for b in blocks(config) for v in b[key]))


def algos(config: dict) -> dict[str, dict]:
    """Every algorithm of every block with its KL coefficients, each once: ``{algo: {"kl": [...]}}``."""
    out = {}
    for b in blocks(config):
        for algo, spec in (b["algos"] or {}).items():
            if spec:
                kls = out.setdefault(algo, {"kl": []})["kl"]
                kls += [kl for kl in spec["kl"] if float(kl) not in map(float, kls)]
    return out


def rl_cells(config: dict) -> list[RLCell]:
    cells = {}
    for b in blocks(config):
        for algo, spec in (b["algos"] or {}).items():
            if not spec:
                continue
            for m, z, kl, s in itertools.product(b["mixtures"], b["scales"], spec["kl"], b["seeds"]):
                cell = RLCell(m, z, algo, float(kl), int(s))
                if not _excluded(asdict(cell), config["grid"].get("exclude", [])):
                    cells.setdefault(cell, None)
    return list(cells)


def pretrain_cells(config: dict) -> list[PretrainCell]:
    """Every (mixture, scale, seed) that is not excluded; an RL cell's base is always included."""
    exclude = config["grid"].get("exclude", [])
    cells = {PretrainCell(m, z, int(s)) for b in blocks(config)
             for m, z, s in itertools.product(b["mixtures"], b["scales"], b["seeds"])
             if not _excluded({"mixture": m, "scale": z, "seed": s}, exclude)}
    cells |= {c.base for c in rl_cells(config)}
    return sorted(cells, key=lambda c: (c.mixture, c.scale, c.seed))


def sources_needed(config: dict, mixtures: list[str] | None = None) -> list[str]:
    """Sources the grid reads: those of its mixtures (or of ``mixtures``), the RL prompts and the eval
    benchmarks."""
    mixtures = values(config, "mixtures") if mixtures is None else mixtures
    needed = {s for m in mixtures for s in config["mixtures"][m]}
    if config.get("rl", {}).get("prompts") and rl_cells(config):
        needed.add(config["rl"]["prompts"]["source"])
    needed |= {b["source"] for b in config.get("eval", {}).get("benchmarks", {}).values()}
    return sorted(needed)


def mixture_sources(config: dict) -> list[str]:
    """Sources whose text the tokenizer is trained on: those of the grid's mixtures."""
    return sorted({s for m in values(config, "mixtures") for s in config["mixtures"][m]})


def n_jobs(config: dict) -> int:
    """Jobs of the whole grid: data per source, tokens per mixture source, the tokenizer, each mixture, each
    pretraining and RL cell with its evaluations (one per benchmark), ingest and report."""
    evals = 1 + len(config.get("eval", {}).get("benchmarks", {}))
    cells = len(pretrain_cells(config)) + len(rl_cells(config))
    data = len(sources_needed(config)) + len(mixture_sources(config)) + 1 + len(values(config, "mixtures"))
    return data + cells * evals + 2


def size_warning(config: dict, *, local: bool) -> str | None:
    """One line when a grid is too large to be meant for the machine it is about to run on."""
    n = n_jobs(config)
    if not local or n <= LOCAL_JOBS:
        return None
    return (f"warning: this grid is {n} jobs ({len(pretrain_cells(config))} pretraining and "
            f"{len(rl_cells(config))} RL cells) for one machine; on a cluster run it with --profile "
            f"profiles/slurm, or narrow it (grid.exclude)")
