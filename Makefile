# Two entry points: `make run` (main job on the embedded default) and `make test` (whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REVIEW_WEB := pipelines/review/web
# TORCH_INDEX=cpu (or cu124, ...) installs torch from PyTorch's own wheel index for that build, e.g. the CPU
# wheel on a GPU-less machine where PyPI's default Linux wheel would pull several GB of CUDA libraries
TORCH_INDEX ?=
TORCH_SOURCE := $(if $(TORCH_INDEX),--index-url https://download.pytorch.org/whl/$(TORCH_INDEX),)

.PHONY: install run test lint bench results clean

install: $(STAMP)

# torch goes first and pinned, so pip takes the local/CPU or CUDA wheel for this machine
# instead of resolving a fresh several-GB build for a loose range. npm ci installs the review page's viewer
# (NiiVue, pinned by package-lock.json) into $(REVIEW_WEB)/node_modules.
$(STAMP): pyproject.toml constraints.txt $(REVIEW_WEB)/package.json $(REVIEW_WEB)/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt $(TORCH_SOURCE) torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	npm ci --prefix $(REVIEW_WEB) --no-audit --no-fund --loglevel=error
	touch $@

run: install
	$(PY) -m monai.bundle run --config_file bundles/ga_ppi.json

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/bench_saliency_ppi.py

# every experiment behind docs/RESULTS.md into runs/results, jobs kept in results/ledger restored instead of run;
# each finished job is added to that ledger (commit it), so the study grows across machines; hours on 2 CPU cores
results: install
	$(PY) -m pipelines.results --out runs/results --publish docs

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(REVIEW_WEB)/node_modules
