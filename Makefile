# The targets a newcomer needs. Everything runs from a virtual environment in $(VENV).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck check bench bench-micro bench-throughput bench-engine gpu-wheels bench-sizes bench-publish bench-gate soak clean

install: $(STAMP)

# torch is pinned to the CPU build that installs from local disk; an unpinned torch pulls
# a multi-GB CUDA build. The ray extra (Ray Serve, for `hotweights fleet`) is installed
# too: its tests run in CI.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[llm,lora,server,ray,dev]"
	touch $(STAMP)

demo: install  ## build two tiny model versions, serve them, swap live under traffic
	$(VENV)/bin/hotweights demo

test: install  ## the test suite
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

typecheck: install
	$(VENV)/bin/mypy

check: lint typecheck test

# Reloads under load, next to TorchServe, MLServer and Ray Serve. Installs the peers into
# their own cached environments on first run (~/.cache/hotweights/bench-peers, about 5
# minutes each); about 20 minutes once they are installed. Results land in bench/results/.
bench: install  ## hotweights vs TorchServe, MLServer, Ray Serve: reloads under load
	$(PY) bench/reload_under_load.py

bench-micro: install  ## admission cost, HTTP overhead, publish-to-reload, sha256, load placement
	$(PY) bench/core_overhead.py
	$(PY) bench/serve_overhead.py
	$(PY) bench/repository.py
	$(PY) bench/load_interference.py

# Batched generation next to llama.cpp's llama-server (built from source on first run) and
# `transformers serve --continuous-batching` on its defaults and tuned (installed into a
# cached environment on first run), same weights and load; then 16 streams across 3
# reloads; then issue #22's targets. About 20 minutes on 2 idle cores once installed.
bench-throughput: install  ## tokens/s, TTFT, gaps vs llama.cpp and transformers serve
	$(PY) bench/throughput.py

bench-engine: install  ## the batched engine's host time per step at 64 rows (1 M model)
	$(PY) bench/engine_overhead.py

# The cp312 wheels bench/gpu_check.sh installs on a GPU machine with no network.
gpu-wheels: install  ## download them into bench/.gpu-wheels (carry that folder there)
	PYTHON=$(PY) bash bench/gpu_wheels.sh

bench-sizes: install  ## reloads at 0.1, 1.3 and 4.3 GB against a bare warm load, idle and under load
	$(PY) bench/reload_sizes.py

bench-publish: install  ## a checkpoint to live through hotweights publish (copy, --link, --move) at 1.3 and 4.3 GB
	$(PY) bench/publish.py

bench-gate: install  ## the quality gate's time against a load; how fast a faulty canary is caught
	$(PY) bench/gate_canary.py

soak: install  ## 10 minutes of steady load with a publish every 30 s: failures, RSS, descriptors
	$(PY) bench/soak.py --duration 600 --reload-every 30 --rate 4

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
