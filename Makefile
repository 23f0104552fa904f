# Rayline: `make demo` runs the pipeline with a live view; `make test` runs every test.
# Both set everything up first (OS packages as root, the virtualenv, the Kafka jars).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/rayline
export PIP_CACHE_DIR ?= $(CACHE)/pip
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: help setup system-deps demo up down status test lint unit integration lock clean docs bench soak

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: system-deps $(VENV)/.installed  ## install everything the stack and tests need

system-deps:
	@scripts/ensure-system-deps.sh

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11 (or make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup  ## bring the stack up and stream synthetic events with a live view
	$(BIN)/rayline demo

up: setup  ## start the local stack and deploy the pipeline
	$(BIN)/rayline up

down:  ## stop everything the stack started
	@test -x $(BIN)/rayline && $(BIN)/rayline down || true

status:
	$(BIN)/rayline status

lint: setup  ## ruff and mypy over the code and the tests
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: setup  ## pure-logic tests: no Ray, no servers
	$(BIN)/pytest tests/unit -q

integration: setup  ## tests and the attack suite against the real local stack (started and stopped here)
	$(BIN)/pytest tests/integration tests/security -q; status=$$?; $(BIN)/rayline down >/dev/null 2>&1 || true; exit $$status

test: lint unit integration  ## everything CI runs

soak: setup  ## 10 minutes at 10,000 events/s through the ingest API with a worker SIGSTOP, a worker SIGKILL, a ClickHouse owner restart and a broker restart (MINUTES=, RATE=; not in CI)
	$(BIN)/rayline up >/dev/null
	$(BIN)/python -m benchmarks.soak --minutes $${MINUTES:-10} --rate $${RATE:-10000}; \
	  status=$$?; $(BIN)/rayline down >/dev/null; exit $$status

# The query benchmark groups its rollups by `region`: the stack is started so.
bench: export RAYLINE_CLICKHOUSE__DIMENSIONS ?= ["region"]
bench: setup  ## processing next to a bare Kafka consumer, latency and memory under load, ingest next to bare Starlette, query latency on 100 M events next to the engine alone (stack started and stopped)
	$(BIN)/rayline up >/dev/null
	$(BIN)/python -m benchmarks.processing --events $${EVENTS:-1000000} \
	  && $(BIN)/python -m benchmarks.ingest --seconds $${INGEST_SECONDS:-15} \
	  && $(BIN)/python -m benchmarks.query --events $${QUERY_EVENTS:-100000000}; \
	  status=$$?; $(BIN)/rayline down >/dev/null; exit $$status

docs: setup  ## regenerate docs/configuration.md from the settings object
	$(BIN)/rayline config --describe --markdown > docs/configuration.md.tmp
	{ sed -n '1,/^<!-- generated -->$$/p' docs/configuration.md; cat docs/configuration.md.tmp; } > docs/configuration.md.new
	mv docs/configuration.md.new docs/configuration.md; rm -f docs/configuration.md.tmp

lock:  ## re-resolve constraints.txt from pyproject.toml (then review the diff)
	rm -rf /tmp/rayline-lock && $(PYTHON) -m venv /tmp/rayline-lock
	/tmp/rayline-lock/bin/pip install -q ".[dev]"
	/tmp/rayline-lock/bin/pip freeze --exclude-editable | grep -v '^rayline' > constraints.txt

# `rayline down --purge` also deletes what the stack keeps outside .state (PostgreSQL's
# cluster under /var/tmp when its user cannot reach .state); without a virtualenv there
# is no `rayline`, and only .state goes.
clean:  ## stop the stack, delete all local state (wherever it lives) and the virtualenv
	@if test -x $(BIN)/rayline; then $(BIN)/rayline down --purge; else rm -rf .state; fi
	rm -rf $(VENV)
