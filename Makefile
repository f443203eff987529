# The targets a newcomer needs. Everything runs from a virtual environment in $(VENV).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck check bench clean

install: $(STAMP)

# torch is pinned to the CPU build that installs from local disk; an unpinned torch pulls
# a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[llm,server,dev]"
	touch $(STAMP)

demo: install  ## build two tiny model versions, serve them, swap live under traffic
	$(VENV)/bin/hotweights demo

test: install  ## the test suite
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: install
	$(VENV)/bin/mypy

check: lint typecheck test

bench: install  ## the benchmarks (not timed tests); results land in bench/results/
	$(PY) bench/core_overhead.py

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
