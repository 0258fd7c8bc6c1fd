# funnelrec: two commands on a fresh machine (Python 3.11 + Java 17):
#   make demo   set up .venv from the lock, then run the nightly pipeline on bundled data
#   make test   set up .venv from the lock, then ruff + the whole test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
UV_VERSION := 0.13.8
BIN := $(VENV)/bin
# torch is pinned as the CPU build (torch==2.13.0+cpu). uv finds it through find-links:
# the machine's local wheel folder when pip is configured with one, else PyTorch's CPU index page.
# On a GPU host see README "GPU hosts" for the CUDA build.
TORCH_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)
DEMO_DATE ?= 2015-09-18
# Hosts that export PYTHONDONTWRITEBYTECODE (CI images often do) would recompile torch, MLflow,
# Airflow and Spark's Python side from source in every process these targets start: about 10 s per
# CLI call, Airflow run and Spark Python worker. Here the first import writes the .pyc files
# (into .venv and the untracked __pycache__ folders) and later processes reuse them.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: help setup setup-gpu demo test test-deps lint format lock clean-demo

help:
	@echo "make demo   - set up .venv and run the nightly pipeline on bundled data ($(DEMO_DATE))"
	@echo "make test   - set up .venv, then ruff check and the whole test suite"
	@echo "make lock   - re-resolve requirements.in into requirements.lock"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BIN)/uv: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"

# The stamp makes setup a no-op until the lock or pyproject changes.
$(VENV)/.synced: requirements.lock pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip sync --python $(BIN)/python --find-links "$(TORCH_FIND_LINKS)" requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.synced

# PyPI's default Linux torch wheel is the CUDA build; only for hosts with an NVIDIA GPU.
setup-gpu: setup
	$(BIN)/uv pip install --python $(BIN)/python --reinstall "torch==2.13.0"

# The nightly DAG and then the scoring DAG (which the champion asset triggers under a scheduler),
# each run by Airflow itself (dag.test(), what `airflow dags test` runs), both in one process so that
# Airflow, Spark and torch start once; Airflow's task logs go to warehouse/airflow/demo.log.
demo: setup
	@mkdir -p warehouse/airflow
	@echo "running funnelrec_nightly, then funnelrec_scoring, for $(DEMO_DATE) through Airflow (log: warehouse/airflow/demo.log)"
	$(BIN)/funnelrec --config infra/demo.yaml dags-test --date $(DEMO_DATE) > warehouse/airflow/demo.log 2>&1 \
	    || { tail -50 warehouse/airflow/demo.log; exit 1; }
	@grep -E '^funnelrec_(nightly|scoring) ' warehouse/airflow/demo.log
	$(BIN)/funnelrec --config infra/demo.yaml status --date $(DEMO_DATE)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The report test renders in Debian's headless Chromium; install it when missing (root or sudo).
test-deps:
	@command -v chromium >/dev/null || { \
	    echo "installing Debian chromium for the report test"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null \
	    || { $$SUDO apt-get update -qq && \
	         $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null; }; }

test: lint test-deps
	$(BIN)/python -m pytest

lock: | $(BIN)/uv
	$(BIN)/uv pip compile requirements.in --find-links "$(TORCH_FIND_LINKS)" \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements.lock

clean-demo:
	rm -rf warehouse
