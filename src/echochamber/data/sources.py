"""Build one source's splits (train, test, hard) in the shared schema, synthetic or from the hub."""

from __future__ import annotations

from echochamber import settings as ec_settings
from echochamber.data import synthetic
from echochamber.io import atomic_path


def source_spec(config: dict, name: str) -> dict:
    """Only the settings one source's data depends on (so editing another source reruns nothing here)."""
    spec = dict(config["data"]["sources"][name])
    if spec["kind"] == "synthetic":
        syn = ec_settings.Synthetic.model_validate(config["data"].get("synthetic", {}))
        for key in ("n_train", "n_test", "n_hard"):
            if spec.get(key) is None:
                spec[key] = syn[key]
        spec["difficulty"] = syn.difficulty.model_dump()
        spec["hard"] = syn.hard.model_dump()
        spec["seed"] = config["seed"]
    return spec


def synthetic_splits(name: str, spec: dict) -> dict[str, list[dict]]:
    easy = synthetic.Difficulty(**spec["difficulty"])
    hard = synthetic.Difficulty(**spec["hard"])
    gen = dict(source=name, render=spec["render"], seed=spec["seed"])
    errors = spec.get("errors") or 0.0      # unchecked solutions: the train split only
    train = synthetic.generate(split="train", n=spec["n_train"], difficulty=easy, errors=errors, **gen)
    seen = {r["question"] for r in train}
    test = synthetic.generate(split="test", n=spec["n_test"], difficulty=easy, exclude=seen, **gen)
    hard_rows = synthetic.generate(split="hard", n=spec["n_hard"], difficulty=hard, exclude=seen, **gen)
    return {"train": train, "test": test, "hard": hard_rows}


def build(name: str, spec: dict, outputs: dict[str, str]) -> dict[str, int]:
    """Write each split to its output path atomically; return rows per split.

    Hub sources are streamed to disk in batches (a corpus need not fit in memory); a hub failure
    raises ``hub.HubError`` naming the dataset and how to point the config at a local copy.
    """
    if spec["kind"] == "hub":
        from echochamber.data import hub
        return hub.write_splits(name, spec, outputs)
    splits = synthetic_splits(name, spec)
    for split, path in outputs.items():
        with atomic_path(path) as tmp:
            synthetic.write_parquet(splits[split], tmp)
    return {s: len(rows) for s, rows in splits.items()}
