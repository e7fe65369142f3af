# `make run` and `make test` do all set-up on a fresh machine: the venv, torch first (the CPU wheel
# pinned in requirements/constraints.txt), then the package with its extras, all pinned.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
PYTEST_ARGS ?=
# if-possible: `make test` installs the test servers' Debian packages when this user can (root or
# passwordless sudo), else prints one line why not and the tests that need them skip; required: fail.
TEST_SERVICES ?= if-possible

export PATH := $(abspath $(VENV))/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1

.PHONY: install run test bench clean-run

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[pipeline,test]'
	$(PY) -m pip install -q -c $(CONSTRAINTS) --no-deps torchao
	$(PY) -m pip check
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

## The whole pipeline on params.yaml (Prefect ephemeral, MLflow on sqlite:///mlflow.db, local DVC cache).
run: install
	rectflow run

## The test suite (real servers where a test needs one: scripts/install-test-services.sh first).
test: install
	bash scripts/install-test-services.sh --$(TEST_SERVICES)
	$(PY) -m pytest -q $(PYTEST_ARGS)

## Benchmarks, run by hand; results go to benchmarks/results/ and BENCHMARKS.md.
bench: install
	$(PY) -m pip install -q --no-deps torchcfm==1.0.7 flow_matching==1.0.10 torchdiffeq==0.2.5
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	$(PY) -m benchmarks.run_all

## Remove generated pipeline outputs (not the venv, not the DVC cache).
clean-run:
	rm -rf data models metrics plots .rectflow mlflow.db mlruns dvc.lock
