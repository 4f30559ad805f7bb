"""Checkpoint manifests: each fault ends in a rerun or one sentence whose advice, followed, works.

Writing and each failure of verification; tests/test_study_faults.py damages the checkpoints of a real tiny
run.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from echochamber import manifest, models
from echochamber.data import tokenizer


def one_sentence_advising(msg: str, fix: Path) -> None:
    """A single sentence that ends by telling to delete ``fix`` and run snakemake again."""
    assert "\n" not in msg and not re.search(r"\.\s", msg), msg
    assert msg.endswith(f"; delete the folder {fix} and run snakemake again to rewrite it"), msg


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture
def checkpoint(tmp_path):
    """A real save_checkpoint folder of a tiny model."""
    texts = ["Ava has 12 apples.\n\nShe gives 3 away. \\boxed{9}", "def simple_math_problem() -> int:"] * 20
    tok = tokenizer.train_bpe(texts, 300)
    model = models.build({"d_model": 16, "n_layers": 1, "n_heads": 2, "mlp_hidden": 32}, tok, max_len=64, seed=3)
    return models.save_checkpoint(model, tok, tmp_path / "model")


def test_save_checkpoint_ends_with_a_manifest_of_every_file(checkpoint):
    files = {p.name for p in checkpoint.iterdir()} - {"manifest.json"}
    assert "model.safetensors" in files and "tokenizer_config.json" in files
    entries = json.loads((checkpoint / "manifest.json").read_text())["files"]
    assert set(entries) == files
    for name, e in entries.items():
        data = (checkpoint / name).read_bytes()
        assert e == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest.verify(checkpoint) == checkpoint
    models.load_checkpoint(checkpoint)      # the manifest does not disturb transformers' loading


def test_checksums_are_computed_in_chunks(tmp_path, monkeypatch):
    f = tmp_path / "blob"
    f.write_bytes(bytes(range(256)) * 41)
    monkeypatch.setattr(manifest, "CHUNK", 1000)          # many reads, one ending mid-way
    assert manifest.sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_each_fault_of_a_checkpoint_is_one_sentence_naming_the_folder_to_delete(checkpoint, tmp_path):
    def fails(match: str, **kw):
        with pytest.raises(manifest.ManifestError) as e:
            manifest.verify(checkpoint, **kw)
        assert re.search(match, str(e.value)), str(e.value)
        one_sentence_advising(str(e.value), checkpoint)

    weights = checkpoint / "model.safetensors"
    size = weights.stat().st_size
    flip_last_byte(weights)                                   # same size: only the checksum sees it
    manifest.verify(checkpoint, checksums=False)
    fails(f"checkpoint {checkpoint} is damaged: the sha256 of model.safetensors differs from its manifest")
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    fails(f"model.safetensors has {size // 2} bytes where its manifest records {size}", checksums=False)
    weights.unlink()
    fails("lacks model.safetensors, which its manifest lists", checksums=False)
    (checkpoint / "manifest.json").write_text("{ cut")
    fails(r"the manifest .*manifest\.json is unreadable \(JSONDecodeError\)")
    (checkpoint / "manifest.json").write_text('{"kind": "checkpoint set", "steps": []}')
    fails("is not that of a checkpoint")
    (checkpoint / "manifest.json").unlink()
    fails(r"has no manifest\.json \(its writer did not finish\)")
    with pytest.raises(manifest.ManifestError, match=f"^checkpoint {tmp_path}/nowhere does not exist; run snakemake"):
        manifest.verify(tmp_path / "nowhere")


def fake_set(root: Path, steps) -> Path:
    for s in steps:
        (root / f"step={s}").mkdir(parents=True)
        (root / f"step={s}" / "weights.bin").write_bytes(bytes([s]) * (100 + s))
        manifest.write(root / f"step={s}")
    manifest.write_set(root, steps)
    return root


def test_a_set_lists_its_planned_steps_and_each_fault_names_the_whole_set(tmp_path):
    root = fake_set(tmp_path / "checkpoints", [1, 3, 10])
    (root / "step=7").mkdir()                                  # a stray folder of an earlier plan
    assert manifest.steps(root) == [1, 3, 10]
    assert manifest.verify_set(root) == {s: root / f"step={s}" for s in (1, 3, 10)}
    assert list(manifest.verify_set(root, [10, 7])) == [10]

    def fails(match: str, only=None):
        with pytest.raises(manifest.ManifestError) as e:
            manifest.verify_set(root, only)
        assert re.search(match, str(e.value)), str(e.value)
        one_sentence_advising(str(e.value), root)            # the set, not the step: its writer is RL

    flip_last_byte(root / "step=3" / "weights.bin")
    manifest.verify_set(root, checksums=False)
    fails(r"step=3 is damaged: the sha256 of weights\.bin")
    manifest.verify_set(root, [1, 10])
    shutil.rmtree(root / "step=3")
    fails(f"checkpoint {root}/step=3 is missing though {root}/manifest.json lists it")
    (root / "manifest.json").unlink()
    fails(r"has no manifest\.json", only=[1])
    with pytest.raises(manifest.ManifestError, match="step=3 does not exist"):
        manifest.write_set(root, [1, 3])                     # a writer cannot finish a set missing a step


def test_check_sizes_skips_what_has_no_manifest_yet(tmp_path):
    """A folder without its manifest is rerun by Snakemake anyway (the manifest is the rule's output)."""
    root = fake_set(tmp_path / "rl" / "checkpoints", [1, 2])
    (tmp_path / "model").mkdir()
    manifest.check_sizes([tmp_path / "model", tmp_path / "absent"], [root, tmp_path / "absent"])
    (root / "step=2" / "weights.bin").write_bytes(b"short")
    with pytest.raises(manifest.ManifestError, match=r"step=2 is damaged: weights\.bin has 5 bytes"):
        manifest.check_sizes([tmp_path / "model"], [root])
