# Two entry points on a fresh machine: `make demo` (the main job: python -m benchmarks.demo) and `make test`.
# Both create .venv and install the package with what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(PY) -m benchmarks.demo

test: $(VENV)/.installed
	$(PY) -m pytest
