# Entry points of the study. On a fresh machine (Python 3.11+, pip, make):
#   make study   # the notebooks at standard scale, then summary.json, README table, report.pdf
#   make test    # the test suite: fast tests, then the slow ones as their own step
# Both create (or reuse) the virtualenv $(VENV) and install what they need into it.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY = $(VENV)/bin/python
PYTHON ?= python3
# dev tools, the PyTorch twin (compare) and Numba's CUDA target (cuda, installs without a GPU)
EXTRAS ?= dev,compare,cuda
NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache
export NUMBA_CACHE_DIR
export MPLBACKEND ?= agg

PYTEST_ARGS ?=
# quick (minutes, under build/quick; never touches the committed study) | standard | full
SCALE ?= standard
STUDY_ARGS ?=

PIP_FILTER = { grep -v "is ignored" || true; }

.PHONY: help install study summary report baseline test test-fast test-slow test-browser \
        lint lab gpu-check clean distclean

help:
	@echo "make study      notebooks 01..06 headless (a new sitting, checked against the committed"
	@echo "                numbers into results/reproduction.json), then summary.json, README table, report.pdf"
	@echo "                (make study SCALE=quick writes under build/quick; STUDY_ARGS=\"--only 01,06\")"
	@echo "make summary    results/summary.json and the README's headline table"
	@echo "make report     report.pdf from the saved results (refuses a dirty tree; --draft via STUDY_ARGS)"
	@echo "make baseline   train the seed CNN on Fashion-MNIST (results/baseline_fashion_mnist.*)"
	@echo "make test       the tests: fast ones, then the slow ones (both print the 20 slowest)"
	@echo "make test-browser  JupyterLab in headless Chromium runs notebook 01"
	@echo "make lint       ruff check"
	@echo "make lab        JupyterLab on notebooks/"
	@echo "make gpu-check  the whole GPU check on a CUDA machine (scripts/gpu_check.sh)"
	@echo "make install    create/update $(VENV) with .[$(EXTRAS)]"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "error: $(PYTHON) is older than 3.11; run e.g. 'make PYTHON=python3.11 ...'" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) \
	  || { echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu install python3-venv" >&2; \
	       rm -rf $(VENV); exit 1; }
	$(PY) -m pip install --quiet --upgrade pip 2>&1 | $(PIP_FILTER)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" 2>&1 | $(PIP_FILTER)
	@touch $@

install: $(VENV)/.installed

test: test-fast test-slow

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" --durations=20 $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow --durations=20 $(PYTEST_ARGS)

test-browser: $(VENV)/.installed
	$(PY) -m pytest -q -m browser $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check cnn study tests scripts benchmarks notebooks

baseline: $(VENV)/.installed
	$(PY) -m study.experiments.baseline --parts train --scale $(SCALE)

study: $(VENV)/.installed
	$(PY) -m study all --scale $(SCALE) $(STUDY_ARGS)

summary: $(VENV)/.installed
	$(PY) -m study summary --readme $(STUDY_ARGS)

report: $(VENV)/.installed
	$(PY) -m study report $(STUDY_ARGS)

lab: $(VENV)/.installed
	env -u MPLBACKEND $(VENV)/bin/jupyter lab notebooks/  # inline figures, not agg

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis .numba_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
