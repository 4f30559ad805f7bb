"""Released pretrained checkpoints as base models: RL starts from them instead of pretraining.

The config key ``base_models: {<mixture>: {<scale>: "<hub id or local folder>"}}`` names, per (mixture,
scale), a ``transformers`` causal LM with its tokenizer. The workflow's ``base_model`` rule materialises
it where the pretrain rule would write (``pretrain/<cell>/model`` plus a zero-row ``curve.parquet``), so
RL, evaluation and the store see an ordinary pretraining cell; every seed of that (mixture, scale) gets
the same checkpoint. Cells not listed are pretrained as usual.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from echochamber import grid as ec_grid

NO_CELL = "(?!)"    # a regex that matches nothing: the base_model rule's cells when none is configured


class BaseModelError(RuntimeError):
    """A base model that cannot be loaded; the message is one sentence naming it."""


def lookup(config: dict, mixture: str, scale: str) -> str | None:
    """The hub id or local folder a (mixture, scale) starts from, or None when it is pretrained."""
    return ((config.get("base_models") or {}).get(mixture) or {}).get(scale)


def cells(config: dict) -> dict[str, str]:
    """Pretraining cells replaced by a released checkpoint: cell id -> hub id or local folder."""
    return {c.id: lookup(config, c.mixture, c.scale) for c in ec_grid.pretrain_cells(config)
            if lookup(config, c.mixture, c.scale)}


def cell_pattern(config: dict) -> str:
    """A regex matching exactly the ids of :func:`cells` (the base_model rule's ``cell`` wildcard)."""
    ids = sorted(cells(config))
    return "|".join(re.escape(i) for i in ids) if ids else NO_CELL


def trained_cells(config: dict) -> list:
    """Pretraining cells that are trained from scratch (no base model)."""
    return [c for c in ec_grid.pretrain_cells(config) if not lookup(config, c.mixture, c.scale)]


def sources_needed(config: dict) -> list[str]:
    """``grid.sources_needed`` without the sources only base-model mixtures would read (never pretrained)."""
    trained = {c.mixture for c in trained_cells(config)}
    return ec_grid.sources_needed(config, [m for m in ec_grid.values(config, "mixtures") if m in trained])


def needs_tokenizer(config: dict) -> bool:
    """Whether any cell is pretrained (base models bring their own tokenizer)."""
    return bool(trained_cells(config))


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].rstrip(".") if lines else "no details"


def materialise(source: str, model_dir: str | os.PathLike, curve: str | os.PathLike, *, log=None) -> Path:
    """Load ``source`` (hub id or local folder) and save it as a checkpoint folder with an empty curve.

    The tokenizer is saved beside the weights with a pad token (its unk or EOS token when it has none), as
    every later stage expects. Raises :class:`BaseModelError` with one sentence when loading fails.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from echochamber.io import atomic_path
    from echochamber.models import save_checkpoint
    from echochamber.pretrain import _write_curve

    local = Path(source).expanduser()
    if not local.exists() and source.startswith(("/", "./", "../", "~")):
        raise BaseModelError(f"base model folder {source!r} does not exist; give base_models.<mixture>.<scale> "
                             f"as an existing local checkpoint folder or a hub id")
    where = f"local folder {str(local)!r}" if local.exists() else f"{source!r} (a hub id or local folder)"
    hint = ("give base_models.<mixture>.<scale> as a local folder holding a transformers checkpoint "
            "(config.json, weights and tokenizer files), e.g. one downloaded with `hf download`")
    name = str(local) if local.exists() else source
    try:
        model = AutoModelForCausalLM.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's base model entry
        raise BaseModelError(f"base model {where} could not be loaded ({type(e).__name__}: {_first_line(e)}); "
                             f"{hint}") from None
    if tokenizer.eos_token is None:
        raise BaseModelError(f"base model {where} has a tokenizer without an EOS token, which RL and "
                             f"evaluation need to end a completion")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    n = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, tokenizer, model_dir)
    with atomic_path(curve) as tmp:
        _write_curve([], tmp)      # no pretraining here: the curve table gets no rows for this cell
    if log:
        log.info("base model %s (%s, %.1fM parameters) saved to %s", source, type(model).__name__, n / 1e6,
                 model_dir)
    return Path(model_dir)
