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

.PHONY: help setup test test-browser test-all demo lint format bench bench-crawl bench-vit bench-train \
	bench-curation bench-learning gpu-wheels gpu-smoke clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install dinoforge with pinned torch/torchvision

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(VENV)/bin/pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

test: setup  ## run the CPU test suite (not slow, not gpu)
	$(PY) -m pytest -q -rs

# The gallery page in a real browser: Debian's Chromium (headless) driven by Playwright. `make test`
# runs the same test when both are present and reports it skipped, saying why, when not.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: setup  ## the curation gallery in headless Chromium (installs chromium + playwright)
	command -v chromium >/dev/null || ($(SUDO) apt-get update -q && \
	    $(SUDO) apt-get install -y -q --no-install-recommends chromium)
	$(PIP_ENV) $(VENV)/bin/pip install -q -c constraints.txt -e '.[$(EXTRAS),browser]'
	$(PY) -m pytest -q -rs tests/pipeline/test_curate.py -k gallery

test-all: setup  ## the suite including tests marked slow
	$(PY) -m pytest -q -rs -m 'not gpu'

# The whole flow, each step the command a user would type. Rerunning resumes every step.
# Round 0 pretrains a bootstrap embedder on the raw crawl (or takes EMBEDDER=an official DINOv2
# .pth, embedded at 224 px); the curation embeds the pool with it, dedups, clusters, retrieves
# around the seed images and fills up to DEMO_TARGET by balanced sampling; round 1 pretrains on
# the curated shards and, as the control, on a uniform sample of the same pool of the same size.
DEMO_TARGET ?= 400
# The tiny bootstrap embedder's CLS features crowd together (docs/pipeline.md, "The demo"):
# its copies threshold is far above the 0.9 of a real DINOv2 backbone.
DEMO_SEMDEDUP ?= $(if $(EMBEDDER),0.9,0.999)
EMBEDDER ?=
DEMO_RUN := $(DEMO_DIR)/run
DEMO_SHARD ?= 500
DEMO_CRAWL = input.urls=$(DEMO_DIR)/urls.parquet crawl.shard_size=$(DEMO_SHARD) \
	crawl.allow_private_networks=true
DEMO_EMBED = $(if $(EMBEDDER),embed.checkpoint=$(EMBEDDER) embed.image_size=224,\
	embed.checkpoint=$(DEMO_DIR)/round0 embed.image_size=64)
DEMO_CURATE = $(DEMO_CRAWL) $(DEMO_EMBED) embed.batch_size=32 semdedup.threshold=$(DEMO_SEMDEDUP) \
	cluster.levels=[40,8] cluster.resampling_steps=[1,4] cluster.sample_sizes=[0,0] \
	curate.target_size=$(DEMO_TARGET) curate.shard_size=250
DEMO_TRAIN = $(TORCHRUN) --standalone --nproc-per-node 2 -m pretrain.train \
	--config configs/pretrain/vit_tiny_cpu.yaml train.steps=$(DEMO_STEPS)
DEMO_KNN = $(PY) -m pretrain.eval knn --ks 10,20 --train $(DEMO_DIR)/eval/train \
	--val $(DEMO_DIR)/eval/val
# Round 1 continues from round 0 (its teacher and heads: configs/pretrain/continue_tiny_cpu.yaml,
# heads first, then the backbone at a tenth of the lr); with EMBEDDER (another architecture than
# the tiny recipe's) it trains from random init as before.
DEMO_ROUND1 = $(if $(EMBEDDER),$(DEMO_TRAIN),$(TORCHRUN) --standalone --nproc-per-node 2 \
	-m pretrain.train --config configs/pretrain/continue_tiny_cpu.yaml train.steps=$(DEMO_STEPS) \
	model.pretrained=$(DEMO_DIR)/round0)
demo: setup  ## the whole flow: crawl, bootstrap embedder, curate on Ray, pretrain on it vs random
	@echo "== 1. simulated web, seed and eval sets; crawl + exact/pHash dedup on local Ray"
	$(PY) -m pipeline.demo crawl --output-dir $(DEMO_DIR) --images $(DEMO_IMAGES) \
	    --shard-size $(DEMO_SHARD)
	@echo "== 2. round 0: the bootstrap embedder$(if $(EMBEDDER),: $(EMBEDDER), pretrained on the raw crawl)"
	$(if $(EMBEDDER),@true,$(DEMO_TRAIN) data.shards=$(DEMO_RUN) output_dir=$(DEMO_DIR)/round0)
	@echo "== 3. curate: embed, semantic dedup, k-means, retrieval + balanced sampling, shards"
	$(PY) -m pipeline run configs/pipeline/curate.yaml output_dir=$(DEMO_RUN) $(DEMO_CURATE) \
	    curate.seeds=$(DEMO_DIR)/seeds curate.retrieval=sample curate.per_seed=4
	$(PY) -m pipeline manifest validate $(DEMO_RUN)
	$(PY) -m pipeline manifest gallery $(DEMO_RUN)
	@echo "== 3b. the control: a uniform sample of the same pool, of the same size"
	$(PY) -m pipeline fork $(DEMO_RUN) $(DEMO_DIR)/random --through cluster --exist-ok
	$(PY) -m pipeline run configs/pipeline/curate.yaml output_dir=$(DEMO_DIR)/random \
	    $(DEMO_CURATE) stages=[curate,write] curate.mode=random
	@echo "== 4. round 1: continue round 0 on the curated shards, and on the random sample"
	$(DEMO_ROUND1) data.shards=$(DEMO_RUN) output_dir=$(DEMO_DIR)/round1_curated
	$(DEMO_ROUND1) data.shards=$(DEMO_DIR)/random output_dir=$(DEMO_DIR)/round1_random
	$(if $(EMBEDDER),@true,$(DEMO_KNN) --checkpoint $(DEMO_DIR)/round0 --output $(DEMO_DIR)/knn_round0.json)
	$(DEMO_KNN) --checkpoint $(DEMO_DIR)/round1_curated --output $(DEMO_DIR)/knn_curated.json
	$(DEMO_KNN) --checkpoint $(DEMO_DIR)/round1_random --output $(DEMO_DIR)/knn_random.json
	$(DEMO_KNN) --checkpoint $(DEMO_DIR)/round1_curated --random-init \
	    --output $(DEMO_DIR)/knn_random_init.json
	@echo "== 5. the closing table (also in $(DEMO_DIR)/report.md)"
	$(PY) -m pipeline.demo report --output-dir $(DEMO_DIR)

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
	$(PY) bench/semdedup_planted.py --data scenes --thresholds 0.75,0.78,0.8 \
		--checkpoint tests/fixtures/vit_test_copy_embedder.safetensors

SMALL_SCALE := model.layerscale_init=1.0 model.patch_size=8 crops.global_crops_size=64 \
	crops.local_crops_size=32 optim.teacher_temp=0.04 optim.momentum_teacher=0.99 \
	head.out_dim=1024 head.ibot_out_dim=1024
bench-learning: setup  ## the silhouettes learning check: stock recipe, small-scale settings, lightly's DINO
	$(PY) bench/learns_shapes.py --data silhouettes --images 8000 --steps 1200 --eval-every 400 --lr 0.004
	$(PY) bench/learns_shapes.py --data silhouettes --images 8000 --steps 1200 --eval-every 400 \
	    --lr 0.004 $(SMALL_SCALE)
	$(PY) bench/peer_lightly_dino.py --steps 1200

# The GPU machine has torch, torchvision, timm, pyarrow, pillow, scipy, pandas, safetensors,
# tensorboard and pytest but no network: the rest of what the checklist imports travels as wheels
# (`carry: [".wheels"]`; see bench/gpu_checklist.py). GPU_PYTHON: the device's Python version.
GPU_PYTHON ?= 3.12
GPU_WHEELS := webdataset==1.0.2 omegaconf antlr4-python3-runtime braceexpand urllib3 \
	xformers==0.0.35 scikit-image lazy-loader imageio tifffile
gpu-wheels: setup  ## download the wheels the GPU checklist needs into .wheels (about 20 MB)
	rm -rf .wheels && $(PIP_ENV) $(VENV)/bin/pip download -q --no-deps --only-binary=:all: \
	    --python-version $(GPU_PYTHON) --platform manylinux_2_28_x86_64 \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .wheels $(GPU_WHEELS)
	@du -sh .wheels

gpu-smoke: setup  ## the GPU checklist's steps on the CPU at toy sizes (before spending device time)
	$(PY) bench/gpu_checklist.py --smoke --out runs/gpu-smoke

clean:  ## remove the virtual environment and run outputs
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
