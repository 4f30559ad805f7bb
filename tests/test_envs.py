"""The conda environment files (for `--sdm conda`) agree with pyproject.toml's dependencies."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
MAIN_ENV = ROOT / "envs" / "echochamber.yaml"


def project() -> tuple[dict[str, Requirement], str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonicalize_name(Requirement(d).name): Requirement(d) for d in meta["dependencies"]}, \
        meta["requires-python"]


def conda_envs() -> list[Path]:
    """Every conda environment file under envs/ (accelerate launch configs are not environments)."""
    out = []
    for path in sorted((ROOT / "envs").rglob("*.y*ml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and "dependencies" in doc:
            out.append(path)
    return out


def problems(env: Path, complete: bool) -> list[str]:
    """What disagrees between one environment file and pyproject.toml; ``complete``: must hold every dependency."""
    deps, requires_python = project()
    out, conda, pip = [], {}, []
    for dep in yaml.safe_load(env.read_text())["dependencies"]:
        if isinstance(dep, dict) and set(dep) == {"pip"}:
            pip += dep["pip"]
        elif isinstance(dep, str):
            name, _, spec = dep.partition("=")
            conda[canonicalize_name(name.strip())] = spec.strip("= ")
        else:
            out.append(f"unexpected entry {dep!r}")
    python = conda.pop("python", "")
    conda.pop("pip", None)
    if not python:
        out.append("python is not pinned")
    elif Version(python.rstrip(".*")) not in SpecifierSet(requires_python):
        out.append(f"python {python} does not satisfy requires-python {requires_python}")
    # Python packages come through pip only, with pyproject's specifiers, so nothing drifts silently.
    out += [f"conda package {name} is not installed through pip like pyproject.toml's" for name in conda]
    seen = {}
    for line in pip:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in seen:
            out.append(f"{name} is listed twice")
        seen[name] = req
        if name not in deps:
            out.append(f"{name} is not a dependency in pyproject.toml")
        elif (req.specifier, req.marker, req.extras) != (deps[name].specifier, deps[name].marker, deps[name].extras):
            out.append(f"{name}: {line!r} here, {str(deps[name])!r} in pyproject.toml")
    if complete:
        out += [f"{name} ({deps[name]}) from pyproject.toml is missing" for name in deps if name not in seen]
    return out


def test_main_env_installs_exactly_the_package_dependencies():
    assert MAIN_ENV in conda_envs()
    assert problems(MAIN_ENV, complete=True) == []


@pytest.mark.parametrize("env", conda_envs(), ids=lambda p: p.name)
def test_every_env_agrees_with_pyproject(env):
    assert problems(env, complete=False) == []


def test_the_check_catches_drift(tmp_path):
    env = yaml.safe_load(MAIN_ENV.read_text())
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    pip[pip.index("duckdb>=1.1")] = "duckdb>=0.9"
    pip.remove("tqdm>=4.60")
    pip.append("requests")
    env["dependencies"][0] = "python=3.8"
    drifted = tmp_path / "drifted.yaml"
    drifted.write_text(yaml.safe_dump(env))
    found = "\n".join(problems(drifted, complete=True))
    for expected in ("duckdb: 'duckdb>=0.9' here", "tqdm (tqdm>=4.60) from pyproject.toml is missing",
                     "requests is not a dependency", "python 3.8 does not satisfy"):
        assert expected in found
