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
PROTOS := $(wildcard protos/segments/v1/*.proto)
GEN_DIR := client/segments/v1
DESCRIPTOR := envoy/segments.pb
REPLICAS ?= 1

.PHONY: help install generate run test check lint typecheck check-generated bench soak clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP) ## create .venv and install the project with its tools

generate: $(STAMP) ## regenerate Python stubs, type stubs and the Envoy descriptor from protos/
	$(PY) scripts/generate.py

run: $(STAMP) ## start PostgreSQL (embedded unless DATABASE_URL), migrate, gRPC server(s) and Envoy
	exec $(VENV)/bin/segments run --replicas $(REPLICAS)

test: $(STAMP) ## run the whole suite (real PostgreSQL, real Envoy)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy service client tests scripts bench

check-generated: $(STAMP) ## fail when generated code is stale
	$(PY) scripts/generate.py --check

check: lint typecheck check-generated ## what CI checks besides the tests

bench: $(STAMP) ## performance benchmark (BENCHMARKS.md); quick run: BENCH_ARGS="--contacts 100000"
	$(PY) -m bench $(BENCH_ARGS)

soak: $(STAMP) ## 3 replicas behind Envoy, 60 s of mixed load, one replica killed midway; quick: SOAK_ARGS="--seconds 30"
	$(PY) scripts/soak.py $(SOAK_ARGS)

clean: ## remove the venv and local data
	rm -rf $(VENV) .data build *.egg-info
