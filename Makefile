# The two commands: `make demo` (the main job, embedded) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

## demo: venv, install, then `resultsvc demo` on SQLite under ./var
demo: $(VENV)/.installed
	$(BIN)/resultsvc demo

## test: venv, install with the dev extra, run the whole suite
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

## bench: the benchmarks in bench/, by hand; figures go into README.md
bench: $(VENV)/.installed-dev
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/projection.py
	$(BIN)/python bench/http_ingest.py
	$(BIN)/python bench/backup.py
	$(BIN)/python bench/restore.py
	$(BIN)/python bench/queue_ingest.py

## lint: ruff and mypy on the packages
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
