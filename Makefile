# Two entry points for a fresh machine: `make run` (the main job on the embedded synthetic default) and
# `make test` (ruff + the test suite). Both build .venv first: the local CPU torch wheel goes in before the
# package, because an open torch range would otherwise pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: setup run test lint
setup: $(VENV)/.installed

# Flags for the search go through ARGS, e.g. a second run: make run ARGS="--resume" or ARGS="--set name=default2".
run: $(VENV)/.installed
	$(PY) -m protopo_ray.tune $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check protopo_ray tests tools

# `-m "not long"`: multi-minute end-to-end tests run by hand (`.venv/bin/python -m pytest tests -m long`).
test: lint
	$(PY) -m pytest -q tests -m "not long"
