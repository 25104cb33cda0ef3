# One virtual environment at .venv, made or reused by every target.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install test demo lint bench clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n auto --dist loadscope

demo: install
	$(PY) tools/demo.py

lint: install
	$(VENV)/bin/ruff check varctl datamodules tests tools
	$(VENV)/bin/ruff format --check varctl datamodules tests tools

bench: install
	$(PY) tools/bench_sample.py
