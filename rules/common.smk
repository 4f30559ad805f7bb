# Config validation, the grid, and path helpers; the only place with helper functions.
import sys
from pathlib import Path

from echochamber import config as ec_config
from echochamber import grid as ec_grid

try:
    ec_config.validate(config, origin="config")
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
    return expand(f"{R}/data/source={{source}}/{{split}}.parquet",
                  source=ec_grid.sources_needed(config), split=ec_grid.SPLITS)


def tokenizer_outputs():
    return [f"{R}/tokenizer/tokenizer_config.json"]
