"""`python -m pretrain.eval` ends once its result is written: on its own, and when something in
the process left a non-daemon thread and a `multiprocessing` child behind (either kept the
interpreter's teardown waiting for good: the shape of the H200 hang, which CPU runs do not
show)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pretrain.data.synthetic import write_shapes_shards

EXIT_TIMEOUT_S = 90  # start-up and a tiny eval take a few seconds; a hang never ends

# Leaves what a library might: a thread waiting forever, a child that sleeps 10 minutes.
LINGERING = """
import multiprocessing, runpy, sys, threading, time
threading.Thread(target=threading.Event().wait, name="lingering", daemon=False).start()
multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,), name="sleeper").start()
sys.argv = ["pretrain.eval", *sys.argv[1:]]
runpy.run_module("pretrain.eval", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    write_shapes_shards(root / "a", 16, per_shard=16, seed=1)
    write_shapes_shards(root / "b", 8, per_shard=8, seed=2)
    return root


def run_cli(cmd: list[str], tmp_path, helpers) -> tuple[int, str]:
    """Run to the end or EXIT_TIMEOUT_S; output through files, as a child that outlives the
    process would hold a pipe open. Its whole process group goes on a timeout."""
    with open(tmp_path / "out.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=helpers.repo, env=helpers.run_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        start = time.monotonic()
        try:
            rc = proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log = (tmp_path / "out.log").read_text()
            pytest.fail(f"still running after {EXIT_TIMEOUT_S} s:\n{log[-3000:]}")
    log = (tmp_path / "out.log").read_text()
    print(f"exited {rc} after {time.monotonic() - start:.1f} s")
    return rc, log


def eval_args(labelled, out) -> list[str]:
    return ["knn", "--random-init", "--model", "vit_test", "--image-size", "56", "--ks", "5",
            "--train", str(labelled / "a"), "--val", str(labelled / "b"), "--output", str(out)]  # fmt: skip


def test_cli_exits_once_the_result_is_written(labelled, tmp_path, helpers):
    out = tmp_path / "knn.json"
    rc, log = run_cli([sys.executable, "-m", "pretrain.eval", *eval_args(labelled, out)],
                      tmp_path, helpers)  # fmt: skip
    assert rc == 0, log[-3000:]
    assert json.loads(out.read_text())["n_val"] == 8 and f"wrote {out}" in log
    assert "still running" not in log  # no thread or child process of its own left


def test_cli_exits_despite_a_lingering_thread_and_child(labelled, tmp_path, helpers):
    out = tmp_path / "knn.json"
    rc, log = run_cli([sys.executable, "-c", LINGERING, *eval_args(labelled, out)],
                      tmp_path, helpers)  # fmt: skip
    assert rc == 0, log[-3000:]
    assert json.loads(out.read_text())["n_train"] == 16
    # the child was stopped; the thread, which nothing can stop, is named (and did not hold it)
    assert "still running once the result is written: thread 'lingering'" in log
    assert "child process" not in log
