"""Suite-wide settings. Area fixtures live in tests/<area>/conftest.py:
tests/pipeline (crawl, Ray, HTTP image server), tests/pretrain (model, losses, data),
tests/train (torchrun jobs, checkpoints, eval)."""

import os

# Keep Ray on loopback, without usage reporting or token auth, in every test process.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Small CPU: one intra-op thread per process keeps multi-process tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
