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
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,spark]"
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
	$(BIN)/pytest tests/integration tests/security -q --durations=15; status=$$?; $(BIN)/rayline down >/dev/null 2>&1 || true; exit $$status

test: lint unit integration  ## everything CI runs

soak: setup  ## 10 minutes at 10,000 events/s through the ingest API with a worker SIGSTOP, a worker SIGKILL, a ClickHouse owner restart and a broker restart (MINUTES=, RATE=; not in CI)
	$(BIN)/rayline up >/dev/null
	$(BIN)/python -m benchmarks.soak --minutes $${MINUTES:-10} --rate $${RATE:-10000}; \
	  status=$$?; $(BIN)/rayline down >/dev/null; exit $$status

# `make bench` runs every benchmark of issue 13 against one local stack, each figure
# next to its reference from the same run, and ends with a summary of the ratio and
# target lines; the whole output is kept in .state/bench/. `make bench QUICK=1` runs
# the same modules with smaller arguments (a few minutes in all). A module that is not
# there (yet) is skipped with a note; one that fails does not stop the others, but
# fails the target. The query benchmark groups its rollups by `region`: the stack is
# started so.
ifdef QUICK
BENCH_PROC_EVENTS ?= 200000
BENCH_RATE ?= 20000
BENCH_SECONDS ?= 20
BENCH_MEMORY_SECONDS ?= 90
BENCH_MEMORY_RATE ?= 20000
BENCH_INGEST_SECONDS ?= 4
BENCH_QUERY_ARGS ?= --events 2000000 --requests 30 --reference-runs 3
BENCH_BATCH_ARGS ?= --events 200000 --upload-rows 20000
else
BENCH_PROC_EVENTS ?= $(or $(EVENTS),1000000)
BENCH_RATE ?= $(or $(RATE),50000)
BENCH_SECONDS ?= 60
BENCH_MEMORY_SECONDS ?= 600
BENCH_MEMORY_RATE ?= $(or $(MEMORY_RATE),30000)
BENCH_INGEST_SECONDS ?= $(or $(INGEST_SECONDS),15)
BENCH_QUERY_ARGS ?= --events $(or $(QUERY_EVENTS),100000000) --requests 100 --clients 4
BENCH_BATCH_ARGS ?= --events 1000000 --upload-rows 200000
endif
BENCH_LOG = .state/bench/bench-$(shell date -u +%Y%m%dT%H%M%SZ).log
# One benchmark module: run it when present, note a failure and go on ($(3): settings
# in the environment for this module only).
define bench_module
if test -f benchmarks/$(1).py; then \
  echo "=== $(3) python -m benchmarks.$(1) $(2)"; \
  env $(3) $(BIN)/python -m benchmarks.$(1) $(2) || { echo "=== benchmarks.$(1) FAILED"; status=1; }; \
else echo "=== benchmarks.$(1) is not in this checkout: skipped"; fi;
endef

bench: export RAYLINE_CLICKHOUSE__DIMENSIONS ?= ["region"]
bench: setup  ## every figure of issue 13 next to its reference from the same run: processing (in-process and deployed) next to a bare consumer, worker RSS drift, ingest next to bare Starlette and a Serve hello-world, queries next to the engine alone and a hello-world, batch jobs next to pyarrow.dataset (QUICK=1: a few minutes; stack started and stopped)
	@mkdir -p .state/bench
	$(BIN)/rayline up >/dev/null
	@log=$(BENCH_LOG); status=0; { \
	  $(call bench_module,processing,--events $(BENCH_PROC_EVENTS) --rate $(BENCH_RATE) --seconds $(BENCH_SECONDS)) \
	  $(call bench_module,pipeline,--events $(BENCH_PROC_EVENTS)) \
	  $(call bench_module,pipeline,--seconds $(BENCH_MEMORY_SECONDS) --rate $(BENCH_MEMORY_RATE),RAYLINE_PIPELINE__DEDUP_HORIZON_SECONDS=60) \
	  $(call bench_module,ingest,--seconds $(BENCH_INGEST_SECONDS)) \
	  $(call bench_module,query,$(BENCH_QUERY_ARGS)) \
	  $(call bench_module,batch,$(BENCH_BATCH_ARGS)) \
	  echo "=== status $$status"; \
	} 2>&1 | tee $$log; \
	echo; echo "summary ($$log):"; \
	grep -aE "^===|ratio|reference|target|met$$|hello-world|RSS|drift|within|rows/s" $$log | grep -av "^=== .*python -m"; \
	$(BIN)/rayline down >/dev/null; grep -q "^=== status 0" $$log

docs: setup  ## regenerate docs/configuration.md from the settings object
	$(BIN)/rayline config --describe --markdown > docs/configuration.md.tmp
	{ sed -n '1,/^<!-- generated -->$$/p' docs/configuration.md; cat docs/configuration.md.tmp; } > docs/configuration.md.new
	mv docs/configuration.md.new docs/configuration.md; rm -f docs/configuration.md.tmp

lock:  ## re-resolve constraints.txt from pyproject.toml (then review the diff)
	rm -rf /tmp/rayline-lock && $(PYTHON) -m venv /tmp/rayline-lock
	/tmp/rayline-lock/bin/pip install -q ".[dev,spark]"
	/tmp/rayline-lock/bin/pip freeze --exclude-editable | grep -v '^rayline' > constraints.txt

# `rayline down --purge` also deletes what the stack keeps outside .state (PostgreSQL's
# cluster under /var/tmp when its user cannot reach .state); without a virtualenv there
# is no `rayline`, and only .state goes.
clean:  ## stop the stack, delete all local state (wherever it lives) and the virtualenv
	@if test -x $(BIN)/rayline; then $(BIN)/rayline down --purge; else rm -rf .state; fi
	rm -rf $(VENV)
