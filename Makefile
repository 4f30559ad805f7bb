# The two commands of the README: `make run` (the embedded study) and `make test` (the test suite);
# `make lint` runs the linters CI runs before the tests.
# All three create .venv on first use and reuse it afterwards (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On a machine without CUDA, take the CPU build of torch (this machine keeps it on disk); on a GPU
# machine pip's default torch (CUDA) is right. Override with `make TORCH=... run`.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
CORES ?= all
# Test files spread over this many pytest-xdist workers (a file's tests stay together, so its module
# fixtures are built once; the longest files go out first, tests/conftest.py); the end-to-end tests wait
# on subprocesses and Slurm, so two workers beat one even on 2 cores (measured on a 2-vCPU Zen 4: 8:36 against 11:03).
TEST_WORKERS ?= 2

.PHONY: run test lint setup clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) ($(TORCH), then echochamber with test extras)..."
	@$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# ruff (pyproject's [tool.ruff]), snakefmt ([tool.snakefmt]) and Snakemake's own lints on every config
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile rules/
	$(BIN)/snakemake --lint
	$(BIN)/snakemake --lint --configfile configs/paper.yaml
	$(BIN)/snakemake --lint --configfile configs/mini_paper.yaml
	$(BIN)/snakemake --lint --configfile configs/seeds.yaml

clean-results:
	rm -rf results .snakemake
