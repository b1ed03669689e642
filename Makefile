# Two entry points: `make run` (main job on the embedded default) and `make test` (whole suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

install: $(STAMP)

# torch goes first and pinned, so pip takes the local/CPU or CUDA wheel for this machine
# instead of resolving a fresh several-GB build for a loose range.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

run: install
	$(PY) -m monai.bundle run --config_file bundles/ga_ppi.json

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/bench_saliency_ppi.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
