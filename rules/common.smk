# Config validation, the grid, and path helpers; the only place with helper functions.
import sys
from pathlib import Path

from echochamber import base_models as ec_base
from echochamber import config as ec_config
from echochamber import grid as ec_grid

CONFIG_ORIGIN = ", ".join(map(str, workflow.overwrite_configfiles)) or "config.yaml"
try:
    ec_config.validate(config, origin=CONFIG_ORIGIN)
except ec_config.ConfigError as e:
    sys.exit(f"Config error: {e}")

R = config["results"]
PY = sys.executable
# Library sources a rule's results depend on: editing them reruns that stage (see rules' inputs).
SRC = Path(workflow.basedir) / "src" / "echochamber"


wildcard_constraints:
    source=r"[A-Za-z0-9]+",
    split="train|test|hard",
    mixture=r"[A-Za-z0-9_.]+",
    scale=r"[A-Za-z0-9.]+",
    algo="|".join(ec_grid.ALGOS),
    kl=r"[0-9.e-]+",
    seed=r"\d+",


def data_outputs():
    # a mixture whose every cell starts from a released checkpoint (base_models) needs none of its data
    return expand(f"{R}/data/source={{source}}/{{split}}.parquet",
                  source=ec_base.sources_needed(config), split=ec_grid.SPLITS)


def tokenizer_outputs():
    # base models bring their own tokenizer; ours is built only when some cell is pretrained
    return [f"{R}/tokenizer/tokenizer_config.json"] if ec_base.needs_tokenizer(config) else []


def final_message():
    """What `make run` prints at the end: the study's summary and where the results are."""
    summary = Path(f"{R}/summary.txt")
    lines = ["", summary.read_text().rstrip()] if summary.exists() else []
    lines += ["", f"Results are under {R}/:"]
    for what, path in [("data (one folder per source)", f"{R}/data"), ("tokenizer", f"{R}/tokenizer"),
                       ("pretrained models", f"{R}/pretrain"), ("RL runs", f"{R}/rl"),
                       ("evaluations", f"{R}/eval"), ("results store (query with `echochamber sql`)", f"{R}/echo.duckdb"),
                       ("report", f"{R}/report.html")]:
        if Path(path).exists():
            lines.append(f"  {what:<48} {path}")
    return "\n".join(lines)
