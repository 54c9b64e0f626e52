# Taskerman: `make demo` or `make test` on a fresh Debian machine with Python 3.11+.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: venv install zookeeper datastores test lint typecheck demo clean

venv: $(BIN)/python

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ required"'
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; }
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml libs/taskerman-dev/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]' -e libs/taskerman-dev
	touch $@

zookeeper:
	bash scripts/install-zookeeper.sh

# redis-server and PostgreSQL from Debian, for the redis and postgres pack tests
datastores:
	bash scripts/install-datastores.sh

# The import graph: no cycles, taskcore below the services, no service importing another.
# No import cycles; taskcore imports no service and no development tooling; services import no other
CHECK_IMPORTS := $(BIN)/python scripts/check_imports.py

lint: install
	$(BIN)/ruff check .
	$(CHECK_IMPORTS)

typecheck: install
	$(BIN)/mypy

test: install zookeeper datastores
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(CHECK_IMPORTS)
	$(BIN)/pytest -q -m "not slow"

demo: install zookeeper
	$(BIN)/python -m taskerman_dev.demo

.PHONY: chaos
# The nemesis against a fleet on 3 NATS servers and 3 ZooKeeper servers, the independent checker's
# report at the end (0 lost, 0 duplicate executions, 0 over-limit, 0 token regressions to pass).
# `make chaos CHAOS_DURATION=120` for a short run; the test suite runs a short one too.
CHAOS_DURATION ?= 1200
CHAOS_ARGS ?=
chaos: install zookeeper
	$(BIN)/python -m taskerman_dev.chaos --duration $(CHAOS_DURATION) --json .taskerman/chaos-report.json $(CHAOS_ARGS)

.PHONY: bench
# Fleet-size figures next to their targets, also written to benchmarks/results/latest.json
# (`make bench BENCH_ARGS=--quick` for small sizes; the test suite runs that version too).
bench: install zookeeper
	$(BIN)/python benchmarks/scale.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .taskerman .pytest_cache .mypy_cache .ruff_cache
