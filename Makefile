# Segments: one entry point for install, code generation, run, test and checks.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REPLICAS ?= 1
REPLICA ?=

.PHONY: help install generate run test check lint typecheck check-generated check-protos proto-baseline bench soak drill clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP) ## create .venv and install the project with its tools

generate: $(STAMP) ## regenerate stubs, Envoy's descriptor and config, and openapi/openapi.json
	$(PY) scripts/generate.py

run: $(STAMP) ## start PostgreSQL (embedded unless DATABASE_URL), migrate, gRPC server(s) and Envoy; REPLICA=1: and a standby
	exec $(VENV)/bin/segments run --replicas $(REPLICAS) $(if $(filter 1,$(REPLICA)),--replica)

test: $(STAMP) ## run the whole suite (real PostgreSQL, real Envoy)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check and ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP) ## mypy --strict over the service, client, tests, scripts and bench
	$(VENV)/bin/mypy service client tests scripts bench

check-generated: $(STAMP) ## fail when generated files are stale
	$(PY) scripts/generate.py --check

check-protos: $(STAMP) ## lint protos/ and fail on breaking changes against protos/baseline.pb
	$(PY) scripts/protocheck.py

proto-baseline: $(STAMP) ## record protos/ as released: the baseline of the breaking-change check
	$(PY) scripts/protocheck.py --baseline

check: lint typecheck check-generated check-protos ## what CI checks besides the tests

bench: $(STAMP) ## performance benchmark (BENCHMARKS.md); quick run: BENCH_ARGS="--contacts 100000"
	$(PY) -m bench $(BENCH_ARGS)

soak: $(STAMP) ## 3 replicas behind Envoy, 60 s of mixed load, one replica killed midway; quick: SOAK_ARGS="--seconds 30"
	$(PY) scripts/soak.py $(SOAK_ARGS)

drill: $(STAMP) ## failover drill: primary lost under load, sync standby promoted, zero lost writes (bench/drill.json)
	$(PY) -m scripts.drill $(DRILL_ARGS)

clean: ## remove the venv and local data
	rm -rf $(VENV) .data build *.egg-info
