"""Fixtures for the training tests: real WebDataset shards (shapes, one corrupt sample, one
truncated tar) and a runner for `torchrun -m pretrain.train` on the CPU with gloo."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds

from pretrain.data.synthetic import write_shapes_shards

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs/pretrain/vit_test_cpu.yaml"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_bad_shards(out_dir: Path, good_tar: Path) -> None:
    """A shard with an undecodable image, and a copy of a good shard cut off mid-stream."""
    with wds.TarWriter(str(out_dir / "bad-sample.tar")) as sink:
        sink.write({"__key__": "broken", "jpg": b"not a jpeg", "json": json.dumps({}).encode()})
        buf = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="JPEG")
        sink.write({"__key__": "fine", "jpg": buf.getvalue(), "json": b"{}"})
    data = good_tar.read_bytes()
    (out_dir / "truncated.tar").write_bytes(data[: len(data) // 2 + 77])


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    """4 good shards of 32 shapes each + 2 bad ones, as a directory."""
    out = tmp_path_factory.mktemp("shards")
    paths = write_shapes_shards(out, n=128, per_shard=32, seed=11)
    write_bad_shards(out, Path(paths[0]))
    return out


def torchrun_cmd(nproc: int, overrides: list[str], *, rdzv: list[str] | None = None) -> list[str]:
    launch = rdzv or ["--standalone"]
    return [TORCHRUN, *launch, "--nproc-per-node", str(nproc), "-m", "pretrain.train",
            "--config", str(CONFIG), *overrides]  # fmt: skip


def run_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    return env


def run_train(nproc: int, overrides: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """Launch torchrun (nproc > 0) or plain python (nproc == 0); never raises on failure."""
    if nproc == 0:
        cmd = [sys.executable, "-m", "pretrain.train", "--config", str(CONFIG), *overrides]
    else:
        cmd = torchrun_cmd(nproc, overrides)
    return subprocess.run(
        cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def helpers():
    """Helpers as a fixture (test files cannot import each other under importlib mode)."""

    class H:
        run_train = staticmethod(run_train)
        read_metrics = staticmethod(read_metrics)
        torchrun_cmd = staticmethod(torchrun_cmd)
        run_env = staticmethod(run_env)
        free_port = staticmethod(free_port)
        repo = REPO
        config = CONFIG

    return H
