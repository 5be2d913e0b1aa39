"""bench/gpu_checklist.py: reports parsed, the budget respected, a hung step cut off with its output."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_checklist.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_checklist", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_last_json_takes_the_final_report_in_either_layout():
    g = _module()
    assert g.last_json('warming up\n{"a": 1}\nnoise\n{"b": 2}\ndone') == {"b": 2}
    block = json.dumps({"results": {"vit_small": [1, 2]}}, indent=2)
    assert g.last_json(f'{{"early": 0}}\nround 0: 3 images/s\n{block}\n') == json.loads(block)
    assert g.last_json("no report\n{ not json") is None


def test_budget_skips_what_no_longer_fits_and_env_reports_versions(tmp_path):
    g = _module()
    argv = sys.argv
    sys.argv = [str(BENCH), "--smoke", "--out", str(tmp_path), "--only", "env,embed",
                "--budget-s", "100"]  # fmt: skip
    try:
        assert g.main() == 0
    finally:
        sys.argv = argv
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["steps"]) == {"env", "embed"}
    env = summary["steps"]["env"]
    assert env["rc"] == 0 and env["report"]["torch"] == torch.__version__
    assert "needs up to 120 s" in summary["steps"]["embed"]["skipped"]
    assert (tmp_path / "00-env.log").read_text().startswith("$ ")
    # the same entries, one row per step as each ended, skipped ones included
    rows = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ["env", "embed"]
    assert rows[0]["report"] == env["report"] and rows[0]["bench"] == "gpu_checklist"
    assert rows[1]["skipped"] == summary["steps"]["embed"]["skipped"]


def test_a_bench_step_brings_back_its_rows_and_a_reused_out_holds_only_this_calls(tmp_path):
    g = _module()
    (tmp_path / "vit.jsonl").write_text('{"kind": "round", "stale": true}\n')  # an earlier call
    argv = sys.argv
    sys.argv = [str(BENCH), "--smoke", "--out", str(tmp_path), "--only", "vit"]
    try:
        assert g.main() == 0
    finally:
        sys.argv = argv
    vit = json.loads((tmp_path / "summary.json").read_text())["steps"]["vit"]
    kinds = [r["kind"] for r in vit["rows"]]
    assert kinds == ["round", "round", "summary"] and not any("stale" in r for r in vit["rows"])
    assert {r["variant"] for r in vit["rows"][:2]} == {"dinoforge-sdpa", "timm"}
    assert vit["rows"][2]["results"] == vit["report"]["results"]["vit_small"]
    (row,) = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert row["step"] == "vit" and row["rows"] == vit["rows"]


def test_a_step_past_its_timeout_is_killed_with_its_children_and_keeps_its_output(tmp_path):
    g = _module()
    script = tmp_path / "hang.py"
    pid_file = tmp_path / "child.pid"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('{\"partial\": 3}', flush=True)\n"
        "time.sleep(60)\n"
    )
    result = g.run_step("hang", [sys.executable, str(script)], 3, tmp_path / "hang.log")
    assert result["rc"] == "timeout" and result["wall_s"] < 30
    assert result["report"] == {"partial": 3}
    assert '{"partial": 3}' in (tmp_path / "hang.log").read_text()
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild was killed with the group (reaped by init)
        if not Path(f"/proc/{child}").exists() or "Z" in _state(child):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"grandchild {child} survived the step's timeout")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
