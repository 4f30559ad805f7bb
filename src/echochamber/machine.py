"""Where a result was made: the machine's CPU, GPUs and library versions, as ``<cell>/machine.json``.

Each pretraining and RL job's main process writes :func:`describe` into its cell folder; the store's
ingest collects them in table ``machines`` and a one-line :func:`summary` in ``meta`` (key ``machine``).
torch is imported inside :func:`describe`, so the store can import this module cheaply.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

FILE = "machine.json"
# The fields of a description and their column types in the store's ``machines`` table.
FIELDS = {"cpu_model": "VARCHAR", "cpu_vendor": "VARCHAR", "cpu_family": "VARCHAR", "cpu_model_number": "VARCHAR",
          "cpu_flags": "VARCHAR", "arch": "VARCHAR", "logical_cpus": "INTEGER", "torch_threads": "INTEGER",
          "gpus": "VARCHAR", "cuda": "VARCHAR", "python": "VARCHAR", "torch": "VARCHAR",
          "transformers": "VARCHAR", "accelerate": "VARCHAR"}
# CPU flags that change how fast (and, through kernels, how exactly) torch computes; amx_* too when present.
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16")


def _cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    out: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out.setdefault(key.strip(), value.strip())
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """This machine and process: CPU model, vendor, family/model numbers and flags, logical CPUs, torch's
    thread count, GPU names and CUDA version (None without CUDA), and the versions of python and the libraries."""
    import torch

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    gpus = None
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpus = ", ".join(f"{names.count(n)} x {n}" if names.count(n) > 1 else n for n in dict.fromkeys(names))
    return {"cpu_model": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_vendor": info.get("vendor_id"), "cpu_family": info.get("cpu family"),
            "cpu_model_number": info.get("model"),
            "cpu_flags": " ".join([f for f in FLAGS if f in flags] + sorted(f for f in flags if f.startswith("amx"))),
            "arch": platform.machine(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpus": gpus, "cuda": torch.version.cuda if gpus else None, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": _version("transformers"), "accelerate": _version("accelerate")}


def write(cell: str | os.PathLike) -> Path:
    """Write :func:`describe` to ``<cell>/machine.json`` atomically; return the path."""
    from echochamber.io import atomic_path

    path = Path(cell) / FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(describe(), indent=1) + "\n")
    return path


def cpu_line(d: dict) -> str:
    """One CPU as a reader needs it to compare figures: model, vendor family/model numbers, the flags of FLAGS."""
    numbers = f"family {d['cpu_family']} model {d['cpu_model_number']}" if d.get("cpu_family") else None
    parts = [p for p in (numbers, d.get("cpu_flags") or "no AVX2") if p]
    return f"{d.get('cpu_model') or '?'} ({', '.join(parts)})"


def summary(described: list[dict]) -> str:
    """One line over several descriptions: the distinct CPUs and GPUs, the thread counts, and how many cells."""
    cpus = sorted({cpu_line(d) for d in described})
    gpus = sorted({d["gpus"] for d in described if d.get("gpus")})
    threads = sorted({d["torch_threads"] for d in described if d.get("torch_threads")})
    n = len(described)
    return (f"CPU {' | '.join(cpus)}; GPU {' | '.join(gpus) or 'none'}; torch threads "
            f"{'/'.join(map(str, threads)) or '?'} ({n} cell{'s' * (n != 1)})")
