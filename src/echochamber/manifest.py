"""Checkpoint manifests: what a writer finished, checked by every consumer before use.

A checkpoint folder (``save_pretrained`` + tokenizer) ends with ``manifest.json``: each file's size and
sha256. A checkpoint set (an RL cell's ``checkpoints/``) ends with its own ``manifest.json``: the steps
the run was planned to save and, per step, the files of its ``step=T/`` folder. Both are written last,
so a manifest exists only when everything it lists is in place; the workflow declares the manifests as
the rules' outputs, so deleting one (or its folder) reruns the job that writes it.

Verification raises :class:`ManifestError` whose message is one sentence naming the path and the
folder to delete so that Snakemake rewrites it. Sizes are cheap (a ``stat``); checksums read every byte,
so the workflow checks sizes of all existing manifests before any job and each consumer job checks the
checksums of what it loads, once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from echochamber.io import atomic_path

NAME = "manifest.json"
SET = "checkpoint set"
CHUNK = 8 << 20     # bytes hashed per read: constant memory for multi-GB weights files


class ManifestError(RuntimeError):
    """A missing or damaged checkpoint; the message is one sentence saying what to delete."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _entries(folder: Path) -> dict[str, dict]:
    """Every file under ``folder`` but the manifest: relative path -> size and sha256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != NAME)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}


def _dump(data: dict, path: Path) -> None:
    """Write JSON atomically: a reader sees no manifest or a whole one."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def write(folder: str | os.PathLike) -> Path:
    """Write ``folder/manifest.json`` over the files now in ``folder``; call it after the last file."""
    folder = Path(folder)
    _dump({"kind": "checkpoint", "files": _entries(folder)}, folder / NAME)
    return folder / NAME


def write_set(root: str | os.PathLike, steps: list[int]) -> Path:
    """Write ``root/manifest.json`` over the planned ``steps``, each a ``step=T/`` folder with its own
    manifest (from :func:`write`); call it after the last step is saved. A missing step raises."""
    root = Path(root)
    checkpoints = {}
    for step in sorted(steps):
        folder = root / f"step={step}"
        files = _read(folder / NAME, root)["files"]
        _check_files(folder, files, root, checksums=False)   # just written: their sizes suffice
        checkpoints[str(step)] = files
    _dump({"kind": SET, "steps": sorted(steps), "checkpoints": checkpoints}, root / NAME)
    return root / NAME


def _advice(problem: str, fix: Path) -> ManifestError:
    return ManifestError(f"{problem}; delete the folder {fix} and run snakemake again to rewrite it")


def _read(path: Path, fix: Path, kind: str = "checkpoint") -> dict:
    if not path.parent.is_dir():
        raise ManifestError(f"checkpoint {path.parent} does not exist; run snakemake again to write it")
    if not path.is_file():
        raise _advice(f"checkpoint {path.parent} has no {NAME} (its writer did not finish)", fix)
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _advice(f"the manifest {path} is unreadable ({type(e).__name__})", fix) from None
    keys = ("files",) if kind == "checkpoint" else ("steps", "checkpoints")
    if not isinstance(m, dict) or m.get("kind") != kind or any(k not in m for k in keys):
        raise _advice(f"the manifest {path} is not that of a {kind}", fix)
    return m


def _check_files(folder: Path, files: dict[str, dict], fix: Path, *, checksums: bool) -> None:
    if not folder.is_dir():
        raise _advice(f"checkpoint {folder} is missing though {fix / NAME} lists it", fix)
    for name, want in files.items():
        p = folder / name
        if not p.is_file():
            raise _advice(f"checkpoint {folder} lacks {name}, which its manifest lists", fix)
        size = p.stat().st_size
        if size != want["size"]:
            raise _advice(f"checkpoint {folder} is damaged: {name} has {size} bytes where its manifest "
                          f"records {want['size']}", fix)
        if checksums and sha256(p) != want["sha256"]:
            raise _advice(f"checkpoint {folder} is damaged: the sha256 of {name} differs from its manifest", fix)


def verify(folder: str | os.PathLike, *, checksums: bool = True) -> Path:
    """Check one checkpoint folder against its manifest (sizes, and checksums unless ``checksums=False``);
    return the folder or raise :class:`ManifestError`."""
    folder = Path(folder)
    _check_files(folder, _read(folder / NAME, folder)["files"], folder, checksums=checksums)
    return folder


def steps(root: str | os.PathLike) -> list[int]:
    """The steps a checkpoint set's manifest lists (never the ``step=T/`` folders that happen to exist)."""
    root = Path(root)
    return [int(s) for s in _read(root / NAME, root, SET)["steps"]]


def verify_set(root: str | os.PathLike, only: list[int] | None = None, *, checksums: bool = True) -> dict[int, Path]:
    """Check a checkpoint set (all its listed steps, or those of ``only``); return ``step -> folder``.

    The advice of every failure is to delete the whole set, since its writer (the RL job) writes all steps."""
    root = Path(root)
    m = _read(root / NAME, root, SET)
    listed = [int(s) for s in m["steps"]]
    wanted = listed if only is None else [s for s in listed if s in set(only)]
    for step in wanted:
        if str(step) not in m["checkpoints"]:
            raise _advice(f"the manifest {root / NAME} lists step {step} without its files", root)
        _check_files(root / f"step={step}", m["checkpoints"][str(step)], root, checksums=checksums)
    return {s: root / f"step={s}" for s in wanted}


def check_sizes(folders=(), sets=()) -> None:
    """Sizes of every checkpoint folder and set that has a manifest (a missing manifest reruns its writer
    anyway); what the workflow checks before scheduling any job."""
    for folder in map(Path, folders):
        if (folder / NAME).is_file():
            verify(folder, checksums=False)
    for root in map(Path, sets):
        if (root / NAME).is_file():
            verify_set(root, checksums=False)
