"""Load and validate a workflow config: a bad config fails in one sentence before any job runs."""

from __future__ import annotations

import functools
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pydantic
import yaml
from pydantic import BaseModel

from echochamber import settings

# Generated from echochamber.settings (schema_yaml); for editors and Snakemake, not read by validate().
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A user mistake in the config; the message is one sentence naming the field."""


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None


def bases(paths) -> list[Path]:
    """The files the given configs overlay (their ``extends``, relative to the file, and those files' own),
    base first, leaving out any file given itself: what is read before the given files."""
    given = {Path(p).resolve() for p in paths}
    found: list[Path] = []

    def visit(path: Path, chain: tuple[Path, ...]) -> None:
        data = _read_yaml(path)
        extends = data.get("extends") if isinstance(data, dict) else None
        if not extends:
            return
        base = (path.parent / str(extends)).resolve()
        if base in chain:
            raise ConfigError(f"{path}: extends: {extends!r} leads back to {path.name} (a cycle)")
        if not base.exists():
            raise ConfigError(f"{path}: extends: {extends!r} does not exist (the path is relative to {path.parent})")
        visit(base, chain + (base,))
        if base not in given and base not in found:
            found.append(base)

    for p in paths:
        visit(Path(p), (Path(p).resolve(),))
    return found


def load(*paths: str | Path) -> dict:
    """The validated config of one file, or of several merged in order as ``snakemake --configfile A B``
    merges them (Snakemake's own ``update_config``: nested keys of later files win, lists are replaced),
    after the files they overlay (``extends``), as the workflow reads them."""
    from snakemake.utils import update_config

    files = [*bases(paths), *map(Path, paths)]
    config = _read_yaml(files[0])
    for path in files[1:]:
        update_config(config, _read_yaml(path) or {})
    validate(config, origin=" + ".join(str(p) for p in paths))
    return config


# YAML 1.1 (PyYAML, Snakemake) reads 1e-4 as a string: it wants a dot in the mantissa (1.0e-4).
_EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _numbers_from_strings(node):
    """Turn strings such as ``1e-4`` into the numbers the user meant, in place; return the node."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        if isinstance(value, str) and _EXPONENT_NUMBER.match(value.strip()):
            node[key] = float(value)
        else:
            _numbers_from_strings(value)
    return node


def _unwrap(t):
    """The type inside ``Annotated[...]`` and ``X | None``."""
    while True:
        if get_origin(t) is Annotated:
            t = get_args(t)[0]
        elif get_origin(t) in (Union, types.UnionType) and type(None) in get_args(t):
            rest = [a for a in get_args(t) if a is not type(None)]
            if len(rest) != 1:
                return t
            t = rest[0]
        else:
            return t


def _walk(loc, root: type[BaseModel], prefix: str) -> tuple[str, Any]:
    """A pydantic error location as the user wrote it (``data.sources.tg.render``, without union tags and
    ``[key]`` markers), and the type found there."""
    parts, t = [prefix] if prefix else [], root
    for part in loc:
        t = _unwrap(t)
        if get_origin(t) in (Union, types.UnionType):      # a discriminated union: ``part`` is the tag
            t = next((m for m in get_args(t) if m.model_fields["kind"].annotation == Literal[part]), None)
            continue
        if part == "[key]":
            continue
        parts.append(str(part))
        if isinstance(t, type) and issubclass(t, BaseModel):
            t = t.model_fields[part].annotation if part in t.model_fields else None
        elif get_origin(t) in (dict, list):
            t = get_args(t)[-1]
    return ".".join(parts) or "(top level)", _unwrap(t)


_OPS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt")}
_TYPES = {"int_type": "integer", "float_type": "number", "bool_type": "boolean", "string_type": "string",
          "list_type": "array", "dict_type": "object", "model_type": "object"}


def _number(x):
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _quoted(text: str) -> str:
    """``"'a', 'b' or 'c'"`` (pydantic's list of expected values) -> ``a, b, c``."""
    return ", ".join(re.findall(r"'([^']*)'", text))


def explain(errors: list[dict], root: type[BaseModel] = settings.Config, prefix: str = "") -> str:
    """The first pydantic error of validating ``root`` as one sentence naming the field (as the user wrote it,
    under ``prefix``) and what is allowed."""
    e = errors[0]
    walk = functools.partial(_walk, root=root, prefix=prefix)
    kind, loc, value, ctx = e["type"], e["loc"], e["input"], e.get("ctx") or {}
    if kind == "extra_forbidden":
        where, model = walk(loc[:-1])
        extra = [x["loc"][-1] for x in errors if x["type"] == kind and x["loc"][:-1] == loc[:-1]]
        allowed = ", ".join(sorted(model.model_fields))
        return f"{where}: unknown key {', '.join(map(repr, extra))}; allowed keys: {allowed}"
    if kind == "missing":
        return f"{walk(loc[:-1])[0]}: {loc[-1]!r} is a required property"
    where = walk(loc)[0]
    if kind == "literal_error":
        return f"{where}: {value!r} is not allowed; allowed values: {_quoted(ctx['expected'])}"
    if kind == "union_tag_invalid":
        key = ctx["discriminator"].strip("'")
        return f"{where}.{key}: {value.get(key)!r} is not allowed; allowed values: {_quoted(ctx['expected_tags'])}"
    if kind == "union_tag_not_found":
        return f"{where}: {ctx['discriminator']} is a required property"
    if kind in _OPS:
        op, bound = _OPS[kind]
        return f"{where}: {value!r} must be {op} {_number(ctx[bound])}"
    if kind in _TYPES:
        return f"{where}: {value!r} must be of type {_TYPES[kind]}"
    if kind in ("too_short", "too_long"):
        bound = f"at least {ctx['min_length']}" if kind == "too_short" else f"at most {ctx['max_length']}"
        return f"{where}: {value!r} has {ctx['actual_length']} item(s); it must have {bound}"
    if kind == "string_too_short":
        return f"{where}: {value!r} must have at least {ctx['min_length']} character(s)"
    if kind == "string_pattern_mismatch":
        return f"{where}: {value!r} must match {ctx['pattern']}"
    if kind == "value_error":
        return f"{where}: {ctx['error']}"
    return f"{where}: {e['msg']}"


def validate(config: object, origin: str = "config") -> None:
    """Raise ConfigError with one clear sentence for the first problem found.

    The one validation path of both ``echochamber validate`` and the workflow: the settings models
    (echochamber.settings), the names the config refers to, the grid, and every stage's cross-field
    checks. Numbers written ``1e-4`` (strings to YAML 1.1) become numbers first, in place.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"{origin}: the config must be a mapping of keys to settings")
    _numbers_from_strings(config)
    try:
        settings.Config.model_validate(config)
    except pydantic.ValidationError as e:
        hint = ""
        if any(x["type"] == "missing" and len(x["loc"]) == 1 for x in e.errors()):
            hint = ("; a file that sets only some top-level keys is an overlay: name the config it extends in it "
                    "(extends: ../config.yaml) or give that config first, as in --configfile config.yaml over.yaml")
        raise ConfigError(f"{origin}: {explain(e.errors())}{hint}") from None
    _check_references(config, origin)
    _check_stages(config, origin)


def schema_yaml() -> str:
    """schemas/config.schema.yaml as generated from echochamber.settings."""
    head = "# Generated from src/echochamber/settings.py by `echochamber schema --write`; do not edit by hand.\n"
    return head + yaml.safe_dump(settings.json_schema(), sort_keys=False, width=120, allow_unicode=True)


def _check_stages(config: dict, origin: str) -> None:
    """Each stage's cross-field checks (batch divisibility, k <= n, ...), as the workflow runs them."""
    from echochamber import evaluate, pretrain
    from echochamber import grid as ec_grid
    from echochamber.rl import settings as rl_settings

    # The stages' checks see every scale and algorithm of the grid, grid.also's included, as one product
    # (they read grid.scales and grid.algos; editing their modules would rerun every job of the stage, the
    # code being the rules' input).
    whole = {**config, "grid": {**config["grid"], "scales": ec_grid.values(config, "scales"),
                                "algos": ec_grid.algos(config)}}
    pretrain.check_config(whole, origin)
    rl_settings.check(whole, origin)
    try:
        evaluate.check_config(config)
    except evaluate.EvalError as e:
        raise ConfigError(f"{origin}: {e}") from None


def _check_references(config: dict, origin: str) -> None:
    """Cross-references the schema cannot express: names used must be defined."""
    sources = config["data"]["sources"]
    for name, mix in config["mixtures"].items():
        for src in mix:
            if src not in sources:
                raise ConfigError(f"{origin}: mixtures.{name}: unknown source {src!r}; "
                                  f"defined in data.sources: {', '.join(sources)}")
    for where, block in _grid_blocks(config["grid"]):
        for key, defined in (("mixtures", config["mixtures"]), ("scales", config["scales"])):
            for name in block.get(key) or []:
                if name not in defined:
                    raise ConfigError(f"{origin}: {where}.{key}: unknown {key[:-1]} {name!r}; "
                                      f"allowed values: {', '.join(map(str, defined))}")
    for mixture, by_scale in (config.get("base_models") or {}).items():
        if mixture not in config["mixtures"]:
            raise ConfigError(f"{origin}: base_models: unknown mixture {mixture!r}; "
                              f"defined in mixtures: {', '.join(config['mixtures'])}")
        for scale in by_scale or {}:
            if scale not in config["scales"]:
                raise ConfigError(f"{origin}: base_models.{mixture}: unknown scale {scale!r}; "
                                  f"defined in scales: {', '.join(map(str, config['scales']))}")
    for scale in config.get("pretrain", {}).get("per_scale", {}):
        if scale not in config["scales"]:
            raise ConfigError(f"{origin}: pretrain.per_scale: unknown scale {scale!r}; "
                              f"defined in scales: {', '.join(map(str, config['scales']))}")
    refs = {f"eval.benchmarks.{b}.source": spec["source"]
            for b, spec in config.get("eval", {}).get("benchmarks", {}).items()}
    if config.get("rl", {}).get("prompts"):
        refs["rl.prompts.source"] = config["rl"]["prompts"]["source"]
    for field, src in refs.items():
        if src not in sources:
            raise ConfigError(f"{origin}: {field}: unknown source {src!r}; "
                              f"defined in data.sources: {', '.join(sources)}")
    synthetic = config["data"].get("synthetic") or {}
    for key in ("difficulty", "hard"):
        d = synthetic.get(key) or {}
        if d.get("min_steps") is not None and d.get("max_steps") is not None and d["min_steps"] > d["max_steps"]:
            raise ConfigError(f"{origin}: data.synthetic.{key}.min_steps: {d['min_steps']} exceeds "
                              f"max_steps {d['max_steps']}; a problem takes between min_steps and max_steps steps")
    for name, scale in config["scales"].items():
        if scale["d_model"] % scale["n_heads"]:
            raise ConfigError(f"{origin}: scales.{name}: d_model {scale['d_model']} is not divisible "
                              f"by n_heads {scale['n_heads']}")
    _check_grid(config, origin)


# A model whose transformer blocks hold this many parameters or more is not meant for CPUs.
GPU_ONLY_PARAMS = 100_000_000


def _check_grid(config: dict, origin: str) -> None:
    """The grid is a set of buildable cells: no duplicates (KL values equal as numbers included), every
    KL value a distinct cell path, at least one cell, and no large model without GPUs."""
    from echochamber import grid as ec_grid
    from echochamber import pretrain

    g = config["grid"]
    kl_values = {}   # across blocks: one value per cell path
    for where, block in _grid_blocks(g):
        for key in ("mixtures", "scales", "seeds"):
            if block.get(key) is not None:
                _no_duplicates(f"{where}.{key}", block[key], origin)
        for algo, spec in (block.get("algos") or {}).items():
            paths = {}
            for kl in (spec or {}).get("kl", []):
                path = ec_grid.kl_str(kl)
                if path in paths:
                    same = "equal" if float(paths[path]) == float(kl) else "too close to tell apart in a cell path"
                    raise ConfigError(f"{origin}: {where}.algos.{algo}.kl: {paths[path]!r} and {kl!r} are {same} "
                                      f"(both kl={path}); list each coefficient once")
                paths[path] = kl
                other = kl_values.setdefault((algo, path), kl)
                if float(other) != float(kl):
                    raise ConfigError(f"{origin}: {where}.algos.{algo}.kl: {kl!r} and {other!r} (elsewhere in the "
                                      f"grid) are too close to tell apart in a cell path (both kl={path})")
    _check_exclude(config, origin)
    pretrain_cells, rl_cells = ec_grid.pretrain_cells(config), ec_grid.rl_cells(config)
    if not pretrain_cells and not rl_cells:
        raise ConfigError(f"{origin}: grid: no cells are left (grid.exclude removes every combination of "
                          f"grid.mixtures, grid.scales and grid.seeds)")
    released = {z for by_scale in (config.get("base_models") or {}).values() for z in (by_scale or {})}
    for name in sorted({c.scale for c in pretrain_cells}):
        n = ec_grid.block_params(config["scales"][name])
        if n < GPU_ONLY_PARAMS:
            continue
        if name not in released and not pretrain.gpus(config, name):
            raise ConfigError(f"{origin}: pretrain.gpus: scale {name} ({n / 1e6:.0f}M parameters in its blocks) "
                              f"is not meant for CPUs; set pretrain.gpus (or pretrain.per_scale.{name}.gpus) "
                              f"or remove {name} from grid.scales")
        if rl_cells and not config.get("rl", {}).get("gpus"):
            raise ConfigError(f"{origin}: rl.gpus: scale {name} ({n / 1e6:.0f}M parameters in its blocks) is "
                              f"not meant for CPUs; set rl.gpus or remove {name} from grid.scales")


def _grid_blocks(g: dict) -> list[tuple[str, dict]]:
    """(where, block) of the main grid and each ``grid.also`` entry as written (keys left out are absent)."""
    return [("grid", g)] + [(f"grid.also.{i}", b) for i, b in enumerate(g.get("also") or [])]


def _check_exclude(config: dict, origin: str) -> None:
    """Each grid.exclude rule names values of the grid: a typo would otherwise exclude nothing, silently."""
    from echochamber import grid as ec_grid

    algos = ec_grid.algos(config)
    listed = {key[:-1]: ec_grid.values(config, key) for key in ("mixtures", "scales", "seeds")}
    listed |= {"algo": list(algos), "kl": [float(kl) for spec in algos.values() for kl in spec["kl"]]}
    for i, rule in enumerate(config["grid"].get("exclude") or []):
        for key, value in rule.items():
            if (float(value) if key == "kl" else value) not in listed[key]:
                raise ConfigError(f"{origin}: grid.exclude.{i}.{key}: {value!r} is not in the grid "
                                  f"({', '.join(map(str, listed[key]))}), so this rule would exclude nothing")


def _no_duplicates(field: str, values: list, origin: str) -> None:
    seen = set()
    for v in values:
        key = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if key in seen:
            raise ConfigError(f"{origin}: {field}: {v!r} is listed twice; a grid lists each value once")
        seen.add(key)
