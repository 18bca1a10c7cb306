# Entry points of the study. On a fresh machine (Python 3.11+, pip, make):
#   make study   # run the six notebooks headless, then results/summary.json and report.pdf
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
# Study scale: quick (minutes, for tests) | standard (the committed study) | full (big hosts)
SCALE ?= standard
STUDY_ARGS ?=

# pip repeats "Location ... is ignored" for find-links folders that do not exist on
# this machine; drop those lines but keep pip's exit status (pipefail).
PIP_FILTER = { grep -v "is ignored" || true; }

.PHONY: help install study summary report baseline test lint lab clean distclean

help:
	@echo "make study      run notebooks/01..06 headless, then results/summary.json and report.pdf"
	@echo "                (make study SCALE=quick; STUDY_ARGS=\"--only 01,06\")"
	@echo "make summary    regenerate results/summary.json from results/*.pkl and print it"
	@echo "make report     rebuild report.pdf from results/summary.json and images/"
	@echo "make test       run the tests (pytest)"
	@echo "make baseline   train the seed CNN on Fashion-MNIST (results/baseline_fashion_mnist.*)"
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
	$(VENV)/bin/ruff check $(wildcard cnn tests scripts notebooks)

# The sequential baseline of the study: seed CNN on Fashion-MNIST (about 7 min on 2 cores).
baseline: $(VENV)/.installed
	$(PY) -m cnn.train --backend numpy --dataset fashion-mnist --model seed_cnn --epochs 15 \
	  --batch-size 64 --lr 0.05 --momentum 0.9 --weight-decay 5e-4 --schedule cosine \
	  --seed 0 --experiment baseline_fashion_mnist --no-progress \
	  --save-metrics results/baseline_fashion_mnist.pkl \
	  --save-weights results/baseline_fashion_mnist.npz $(BASELINE_ARGS)

study: $(VENV)/.installed
	$(PY) -m cnn.study --scale $(SCALE) $(STUDY_ARGS)

summary: $(VENV)/.installed
	$(PY) -m cnn.summary --print

report: $(VENV)/.installed
	$(PY) -m cnn.study report

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis .numba_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
