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
DEMO_IMAGES ?= 1500
DEMO_STEPS ?= 150
TORCHRUN := $(VENV)/bin/torchrun
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: help setup test test-all demo lint format bench bench-crawl bench-vit bench-train \
	bench-curation bench-learning clean

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

# The whole flow, each step the command a user would type. Rerunning resumes every step.
demo: setup  ## crawl a simulated web on Ray, pretrain vit_test on it (2 ranks), k-NN eval
	$(PY) -m pipeline.demo --output-dir $(DEMO_DIR) --images $(DEMO_IMAGES)
	$(PY) -m pipeline manifest validate $(DEMO_DIR)/run
	$(TORCHRUN) --standalone --nproc-per-node 2 -m pretrain.train \
	    --config configs/pretrain/vit_test_cpu.yaml data.shards=$(DEMO_DIR)/run \
	    output_dir=$(DEMO_DIR)/train train.steps=$(DEMO_STEPS)
	@echo "== k-NN (label = source photograph), pretrained teacher vs the same ViT at random init"
	$(PY) -m pretrain.eval knn --checkpoint $(DEMO_DIR)/train --ks 10,20 \
	    --train '$(DEMO_DIR)/run/crawl/0000[0-1].tar' --val '$(DEMO_DIR)/run/crawl/00002.tar' \
	    --output $(DEMO_DIR)/knn_pretrained.json
	$(PY) -m pretrain.eval knn --random-init --checkpoint $(DEMO_DIR)/train --ks 10,20 \
	    --train '$(DEMO_DIR)/run/crawl/0000[0-1].tar' --val '$(DEMO_DIR)/run/crawl/00002.tar' \
	    --output $(DEMO_DIR)/knn_random_init.json

lint: setup  ## ruff lint + format check
	$(VENV)/bin/ruff check pipeline pretrain tests bench
	$(VENV)/bin/ruff format --check pipeline pretrain tests bench

format: setup  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix pipeline pretrain tests bench
	$(VENV)/bin/ruff format pipeline pretrain tests bench

bench: bench-crawl bench-vit bench-train bench-curation  ## every benchmark; figures go to docs/benchmarks.md

bench-crawl: setup  ## dinoforge vs img2dataset crawl throughput and memory
	$(PY) bench/bench_crawl.py

bench-vit: setup  ## ViT forward+backward vs timm on multi-crop batches
	$(PY) bench/bench_vit.py

bench-train: setup  ## training throughput with a per-phase breakdown
	$(PY) bench/bench_train.py

bench-curation: setup  ## embed stage vs bare forward, semantic dedup, k-means vs FAISS, retrieval, writing
	$(PY) bench/bench_embed.py --images 256 --shard-size 128 --rounds 3
	$(PY) bench/bench_semdedup.py
	$(PY) bench/bench_kmeans.py
	$(PY) bench/bench_curate.py
	$(PY) bench/semdedup_planted.py

SMALL_SCALE := model.layerscale_init=1.0 model.patch_size=8 crops.global_crops_size=64 \
	crops.local_crops_size=32 optim.teacher_temp=0.04 optim.momentum_teacher=0.99 \
	head.out_dim=1024 head.ibot_out_dim=1024
bench-learning: setup  ## the silhouettes learning check: stock recipe, small-scale settings, lightly's DINO
	$(PY) bench/learns_shapes.py --data silhouettes --images 8000 --steps 1200 --eval-every 400 --lr 0.004
	$(PY) bench/learns_shapes.py --data silhouettes --images 8000 --steps 1200 --eval-every 400 \
	    --lr 0.004 $(SMALL_SCALE)
	$(PY) bench/peer_lightly_dino.py --steps 1200

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
