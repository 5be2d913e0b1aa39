# dinoforge: `make help` lists the targets. `make test` and `make demo` set everything up
# themselves on a fresh machine (a .venv beside this file).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The machine's pip configuration adds a folder with a CPU-only torch wheel that sorts above the
# registry's build and does not match any torchvision: install with that configuration ignored.
PIP_ENV := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null
EXTRAS ?= cpu,dev
DEMO_DIR ?= demo_run
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: help setup test test-all demo lint format bench bench-crawl bench-vit bench-train clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install dinoforge with pinned torch/torchvision

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(VENV)/bin/pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

test: setup  ## run the CPU test suite (not slow, not gpu)
	$(PY) -m pytest -q -rs

test-all: setup  ## the suite including tests marked slow
	$(PY) -m pytest -q -rs -m 'not gpu'

demo: setup  ## the whole flow on a simulated web served from 127.0.0.1
	$(PY) -m pipeline.demo --output-dir $(DEMO_DIR)

lint: setup  ## ruff lint + format check
	$(VENV)/bin/ruff check pipeline pretrain tests bench
	$(VENV)/bin/ruff format --check pipeline pretrain tests bench

format: setup  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix pipeline pretrain tests bench
	$(VENV)/bin/ruff format pipeline pretrain tests bench

bench: bench-crawl bench-vit bench-train  ## every benchmark; figures go to docs/benchmarks.md

bench-crawl: setup  ## dinoforge vs img2dataset crawl throughput and memory
	$(PY) bench/bench_crawl.py

bench-vit: setup  ## ViT forward+backward vs timm on multi-crop batches
	$(PY) bench/bench_vit.py

bench-train: setup  ## training throughput with a per-phase breakdown
	$(PY) bench/bench_train.py

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
