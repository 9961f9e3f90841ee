# Two entry points for a fresh machine: `make run` (the main job on the embedded synthetic default) and
# `make test` (ruff + the test suite). Both build .venv first, every package at the version requirements.lock
# pins: the local CPU torch wheel goes in before the package, because an open torch range would otherwise pull
# a multi-GB CUDA build. `make lock` refreshes the lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
LOCK := requirements.lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

.PHONY: setup run test lint lock
setup: $(VENV)/.installed

# Flags for the search go through ARGS, e.g. a second run: make run ARGS="--resume" or ARGS="--set name=default2".
run: $(VENV)/.installed
	$(PY) -m protopo_ray.tune $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check protopo_ray tests tools

# `-m "not long"`: multi-minute end-to-end tests run by hand (`.venv/bin/python -m pytest tests -m long`).
test: lint
	$(PY) -m pytest -q tests -m "not long" --durations=20

# Resolve pyproject.toml's ranges afresh in a scratch venv and freeze the result into requirements.lock (its
# header comment is kept). Commit the new lock; the next `make` rebuilds .venv from it.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q "$(TORCH_SPEC)"
	.lock-venv/bin/python -m pip install -q -e ".[dev]"
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/python -m pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv
