# make run: install into .venv and run the embedded default (DPO + LoRA on a tiny model, 2 CPU processes)
# make test: install into .venv and run the CPU test suite
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: install run test golden bench-plan slurm chromium
install: $(STAMP)
$(STAMP):
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 first: this machine kind ships its CPU build on disk; nothing below then pulls CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	touch $@

run: install
	$(BIN)/python -m launcher

test: install slurm chromium
	$(BIN)/python -m pytest -q tests

# Debian's Slurm and munge, for the tests that run a real one-node cluster (skipped where they cannot install)
slurm:
	@command -v slurmctld >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd munge slurm-client \
	  >/dev/null; } || echo "Slurm could not be installed: its tests will be skipped"

# Debian's Chromium, for the test that renders the run report headless (skipped where it cannot install)
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "Chromium could not be installed: the report's browser test will be skipped"

# Rewrite tests/golden/ from the current renderers; review the diff before committing it.
golden: install
	UPDATE_GOLDEN=1 $(BIN)/python -m pytest -q tests/test_plan.py

bench-plan: install
	$(BIN)/python scripts/bench_dry_run.py
