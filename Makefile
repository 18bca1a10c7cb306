# Entry points of the study. On a fresh machine (Python 3.11+, pip, make):
#   make study   # run the study (for now: train the seed CNN on digits, print test accuracy)
#   make test    # run the test suite
# Both create (or reuse) the virtualenv $(VENV) and install what they need into it.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY = $(VENV)/bin/python
# The interpreter that creates the venv (must be 3.11 or newer).
PYTHON ?= python3
# Extras installed into the venv: dev tools and the PyTorch twin the tests compare against.
EXTRAS ?= dev,compare
# Numba's on-disk JIT cache, shared by the test runs and the study.
NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache
export NUMBA_CACHE_DIR

PYTEST_ARGS ?=
BASELINE_ARGS ?=

# pip repeats "Location ... is ignored" for find-links folders that do not exist on
# this machine; drop those lines but keep pip's exit status (pipefail).
PIP_FILTER = { grep -v "is ignored" || true; }

.PHONY: help install study baseline test lint lab clean distclean

help:
	@echo "make study      run the study (for now: the seed-CNN baseline on digits)"
	@echo "make test       run the tests (pytest)"
	@echo "make baseline   train the seed CNN on the embedded digits dataset"
	@echo "make lint       ruff check"
	@echo "make lab        JupyterLab on notebooks/"
	@echo "make install    create/update $(VENV) with .[$(EXTRAS)]"
	@echo "make clean      remove caches; make distclean also removes $(VENV)"

# Stamp file: (re)install whenever pyproject.toml changes.
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

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(wildcard cnn tests scripts)

# The seed CNN on scikit-learn's embedded digits (no download): prints the test accuracy.
baseline: $(VENV)/.installed
	$(PY) -m cnn.train --backend numpy --dataset digits --model seed_cnn --epochs 10 \
	  --seed 0 $(BASELINE_ARGS)

# For now the study is the baseline run. A later issue replaces this with running
# notebooks/ top to bottom (results/*.pkl, images/) and building report.pdf.
study: baseline

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis .numba_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
