# dingtalk-etl: `make demo` and `make test` set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest slow bench clean help

help:
	@echo "make demo   - create .venv, install, run the demo against the bundled simulator"
	@echo "make test   - create .venv, install test deps, lint, type-check, run all tests"
	@echo "make bench  - throughput benchmark (see README)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dingtalk-etl demo

lint: $(STAMP)
	$(BIN)/ruff check etl tests migrations bench
	$(BIN)/ruff format --check etl tests migrations bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

slow: $(STAMP)
	$(BIN)/pytest -m slow

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo.db demo.db-* demo.db.lock
