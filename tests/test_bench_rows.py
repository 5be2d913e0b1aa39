"""Benchmarks write their figures row by row (bench/_rows.py): each row is on disk the moment it
exists, so a bench killed part-way keeps what it had measured."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _rows_module():
    spec = importlib.util.spec_from_file_location("_rows", BENCH / "_rows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_row_is_on_disk_when_write_returns_and_a_cut_last_line_is_left_out(tmp_path):
    rows = _rows_module()
    path = tmp_path / "deep" / "x.jsonl"
    writer = rows.RowWriter(path, "x")
    stamped = writer.write({"a": 1})
    assert json.loads(path.read_text()) == stamped  # readable before anything is closed
    assert stamped["bench"] == "x" and stamped["run"] == writer.run and stamped["a"] == 1
    writer.write({"a": 2})
    with path.open("a") as f:
        f.write('{"a": 3, "cut off')  # a kill in the middle of a line
    assert [r["a"] for r in rows.read_rows(path)] == [1, 2]


def test_bench_train_on_the_cpu_writes_one_row_per_case(tmp_path):
    """The smallest training bench (gloo, one rank): the timing totals reduced on the device
    (here the CPU) and the case's row in the JSON-lines file with its figures."""
    jsonl = tmp_path / "train.jsonl"
    cmd = [sys.executable, str(BENCH / "bench_train.py"), "--steps", "2", "--warmup", "1",
           "--models", "vit_test", "--nprocs", "1", "--batch", "4", "--images", "64",
           "--jsonl", str(jsonl)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert row["bench"] == "train" and row["model"] == "vit_test" and row["nproc"] == 1
    assert row["device"] == "cpu" and row["steps"] == 2 and row["global_size"] == 56
    assert row["images_per_sec"] > 0
    phases = [f"{p}_s_per_step" for p in ("data", "forward", "backward", "optimizer", "ema")]
    assert all(row[k] >= 0 for k in phases) and 0 <= row["data_share"] <= 1
    printed = json.loads(done.stdout.splitlines()[0])  # stdout unchanged: the worker's dict
    assert printed == {k: v for k, v in row.items() if k in printed} and "bench" not in printed


def test_bench_vit_killed_after_its_first_measurement_keeps_it(tmp_path):
    jsonl = tmp_path / "vit.jsonl"
    cmd = [sys.executable, str(BENCH / "bench_vit.py"), "--batch", "2", "--model", "vit_small",
           "--global-size", "28", "--local-size", "14", "--n-local", "1", "--iters", "1",
           "--rounds", "4", "--threads", "1", "--jsonl", str(jsonl)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (jsonl.is_file() and jsonl.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no row within 120 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the bench and its measuring subprocess
        proc.communicate()
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert 1 <= len(rows) < 8 and all(r["kind"] == "round" for r in rows)  # no summary: killed
    first = rows[0]
    assert first["bench"] == "vit" and first["model"] == "vit_small" and first["round"] == 0
    assert first["variant"] in ("dinoforge-sdpa", "timm") and first["images_per_s"] > 0
    assert first["dtype"] == "fp32" and first["batch"] == 2 and "peak_mem_mib" in first
