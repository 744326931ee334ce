# dingtalk-etl: `make demo` and `make test` set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest slow bench bench-events bench-month bench-scale clean help deps-system

help:
	@echo "make demo   - create .venv, install, run the demo against the bundled simulator"
	@echo "make test   - create .venv, install test deps, lint, type-check, run all tests"
	@echo "make bench  - throughput benchmark (see README)"
	@echo "make bench-events - group-event benchmark of listen (see README)"
	@echo "make bench-month - a simulated month of the poll plan: API calls, delays (see README)"
	@echo "make bench-scale - CLI and reports on a year of 2,000 chats on PostgreSQL (see README)"

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

# Four workers on two cores: most tests wait on HTTP, databases and child processes, and two
# workers left the cores idle two thirds of the time. One test file per worker, so that
# module-scoped scenario databases are built once. The slow variants run in the same pass, so
# that they overlap with the rest instead of following it.
PYTEST_N ?= 4
pytest: $(STAMP)
	$(BIN)/pytest -n $(PYTEST_N) --dist loadfile -m 'slow or not slow'

test: deps-system lint typecheck pytest

# Headless Chromium renders the HTML audit report in the tests. Installed when missing and
# possible (root with apt-get); otherwise that test is skipped locally and fails in CI.
deps-system:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (headless browser for the HTML report test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "note: chromium not found and not installable here; the HTML rendering test will skip"; \
	fi

slow: $(STAMP)
	$(BIN)/pytest -m slow

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

bench-events: $(STAMP)
	$(BIN)/python bench/events.py

bench-month: $(STAMP)
	$(BIN)/python bench/month.py

bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo.db demo.db-* demo.db.lock
