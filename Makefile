# Two commands for a newcomer: `make demo` and `make test`. Both bootstrap what a fresh machine lacks.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: demo test bench lint system-deps clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Debian packages: redis-server for the Redis tests and benchmarks, rocksdb-tools for db_bench.
system-deps:
	@if ! command -v redis-server >/dev/null || ! command -v db_bench >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server rocksdb-tools >/dev/null; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

test: $(STAMP) system-deps lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/recserve demo

bench: $(STAMP) system-deps
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
