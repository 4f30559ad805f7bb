"""Where a result was made: the description each pretraining and RL cell writes as machine.json."""

import json
import os
import platform

import torch

from echochamber import machine


def test_the_description_has_every_field_on_this_machine(tmp_path):
    d = machine.describe()
    assert list(d) == list(machine.FIELDS)
    assert d["cpu_model"] and d["arch"] == platform.machine() and d["logical_cpus"] == os.cpu_count()
    assert d["torch_threads"] == torch.get_num_threads() and d["torch"] == torch.__version__
    assert d["python"] == platform.python_version() and d["transformers"] and d["accelerate"]
    if "vendor_id" in machine._cpuinfo():                 # an x86 Linux machine
        assert d["cpu_vendor"] and d["cpu_family"].isdigit() and d["cpu_model_number"].isdigit()
    known = set(machine.FLAGS)
    assert all(f in known or f.startswith("amx") for f in d["cpu_flags"].split())
    assert (d["gpus"] is None) == (not torch.cuda.is_available()) and (d["cuda"] is None) == (d["gpus"] is None)
    path = machine.write(tmp_path / "cell")
    assert path == tmp_path / "cell" / "machine.json" and json.loads(path.read_text())["cpu_model"] == d["cpu_model"]
    assert [p.name for p in (tmp_path / "cell").iterdir()] == ["machine.json"]      # nothing half-written left


def test_without_cpuinfo_the_model_comes_from_platform(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: {})
    d = machine.describe()
    assert d["cpu_model"] == (platform.processor() or platform.machine()) and d["cpu_vendor"] is None
    assert d["cpu_flags"] == ""


def test_the_summary_names_the_distinct_cpus_gpus_and_thread_counts():
    a = {"cpu_model": "AMD EPYC", "cpu_family": "25", "cpu_model_number": "1", "cpu_flags": "avx2 fma",
         "gpus": None, "torch_threads": 1}
    b = {"cpu_model": "B", "cpu_flags": "", "gpus": "NVIDIA H100", "torch_threads": 2}
    assert machine.summary([a]) == "CPU AMD EPYC (family 25 model 1, avx2 fma); GPU none; torch threads 1 (1 cell)"
    assert machine.summary([a, b, b]) == ("CPU AMD EPYC (family 25 model 1, avx2 fma) | B (no AVX2); "
                                          "GPU NVIDIA H100; torch threads 1/2 (3 cells)")
