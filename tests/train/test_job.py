"""The training job end to end: torchrun processes with gloo on real shards."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.arch import build_student_teacher
from pretrain.config import load_train_config
from pretrain.models import build_backbone

METRIC_FIELDS = {
    "step", "loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "wd", "momentum",
    "teacher_temp", "images_per_sec",
}  # fmt: skip


def base_overrides(shard_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.shards={shard_dir}", f"output_dir={out}", "train.steps=6", "train.log_every=1",
            "train.checkpoint_every=3", "data.num_workers=1", *extra]  # fmt: skip


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


@pytest.fixture(scope="module")
def full_run(shard_dir, helpers, tmp_path_factory) -> Path:
    """2 processes, 6 steps, uninterrupted."""
    out = tmp_path_factory.mktemp("full") / "run"
    check_ok(helpers.run_train(2, base_overrides(shard_dir, out)))
    return out


@pytest.fixture(scope="module")
def stopped_run(shard_dir, helpers, tmp_path_factory) -> Path:
    """The same command, stopped after step 3 as if preempted (checkpoint at 3, no export)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    check_ok(helpers.run_train(2, base_overrides(shard_dir, out, "train.stop_after=3")))
    return out


def test_two_processes_train_and_write_outputs(full_run, helpers):
    records = helpers.read_metrics(full_run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert METRIC_FIELDS <= set(r)
        assert all(math.isfinite(r[k]) for k in ("loss", "dino_loss", "ibot_loss", "koleo_loss"))
        assert r["images_per_sec"] > 0 and r["corrupt_samples"] >= 0
    assert records[0]["lr"] < records[-1]["lr"]  # warm-up
    assert records[0]["teacher_temp"] == pytest.approx(0.04)
    assert (full_run / "config.yaml").is_file()
    assert list((full_run / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert ckpts == ["step_0000003", "step_0000006"]


def test_corrupt_input_is_counted_over_every_loader_worker(shard_dir, helpers, tmp_path):
    """Two DataLoader workers: one meets only the undecodable sample, the other only the
    truncated tar. Every logged step reports both kinds, summed over the workers."""
    out = tmp_path / "run"
    shards = f"data.shards=[{shard_dir / 'bad-sample.tar'},{shard_dir / 'truncated.tar'}]"
    check_ok(helpers.run_train(0, [*base_overrides(shard_dir, out, "data.num_workers=2"),
                                   shards, "train.steps=4", "train.checkpoint_every=4"]))  # fmt: skip
    records = helpers.read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["corrupt_samples"] >= 1 and records[-1]["corrupt_tars"] >= 1
    for earlier, later in zip(records, records[1:]):  # running totals never go back
        assert later["corrupt_samples"] >= earlier["corrupt_samples"]
        assert later["corrupt_tars"] >= earlier["corrupt_tars"]


def test_teacher_moved_and_export_loads(full_run):
    cfg = load_train_config(str(full_run / "config.yaml"))
    torch.manual_seed(cfg.train.seed)  # the job's initial weights
    _, initial_teacher = build_student_teacher(cfg)
    before = initial_teacher.backbone.dinov2_state_dict()
    after = load_file(str(full_run / "teacher_backbone.safetensors"))
    assert set(after) == set(before)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > 0.8 * len(before), f"teacher barely moved: {len(moved)}/{len(before)}"
    backbone = build_backbone("vit_test", img_size=56)
    backbone.load_dinov2_checkpoint(full_run / "teacher_backbone.safetensors")
    assert torch.equal(backbone.cls_token.detach(), after["cls_token"])


def test_stop_and_resume_matches_uninterrupted(full_run, stopped_run, shard_dir, helpers, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    assert not (run / "teacher_backbone.safetensors").exists()
    assert [r["step"] for r in helpers.read_metrics(run)] == [1, 2, 3]
    check_ok(helpers.run_train(2, base_overrides(shard_dir, run)))  # the very same command
    resumed, reference = helpers.read_metrics(run), helpers.read_metrics(full_run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, reference):
        for key in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    got = load_file(str(run / "teacher_backbone.safetensors"))
    want = load_file(str(full_run / "teacher_backbone.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_two_process_checkpoint_resumes_on_one_process(stopped_run, shard_dir, helpers, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    proc = helpers.run_train(1, base_overrides(shard_dir, run))
    check_ok(proc)
    assert "resumed from" in proc.stderr and "written by 2 ranks, resuming on 1" in proc.stderr
    records = helpers.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (run / "teacher_backbone.safetensors").is_file()


def test_two_nodes_on_one_machine(shard_dir, helpers, tmp_path):
    port = helpers.free_port()
    out = tmp_path / "run"
    overrides = base_overrides(shard_dir, out, "train.steps=2", "logging.tensorboard=false")
    procs = []
    for node in (0, 1):
        rdzv = ["--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "twonodes"]  # fmt: skip
        cmd = helpers.torchrun_cmd(1, overrides, rdzv=rdzv)
        procs.append(subprocess.Popen(cmd, cwd=helpers.repo, env=helpers.run_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-4000:]
    assert "2 ranks, global batch 16" in results[0][1] + results[1][1]
    assert [r["step"] for r in helpers.read_metrics(out)] == [1, 2]


def test_activation_checkpointing_gives_the_same_losses(full_run, shard_dir, helpers, tmp_path):
    out = tmp_path / "ac"
    proc = helpers.run_train(2, base_overrides(shard_dir, out, "train.steps=2",
                                               "dist.activation_checkpointing=true"))  # fmt: skip
    check_ok(proc)
    # Same seed and data: recomputing activations must not change the numbers (lr differs:
    # the schedule length does, so compare step 1, taken at lr 0).
    got, want = helpers.read_metrics(out)[0], helpers.read_metrics(full_run)[0]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_no_code(stopped_run, tmp_path):
    """DCP's own reader unpickles `.metadata` and torch.loads non-tensor items with
    weights_only=False; dinoforge's loader refuses both, and still loads a genuine checkpoint."""
    import io
    import pickle

    from pretrain.dcp_safe import SafeLoadPlanner, UnsafeCheckpointError
    from pretrain.export import load_teacher_backbone

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    genuine = load_teacher_backbone(run)  # no export in a stopped run: the DCP checkpoint
    assert genuine.cls_token.abs().sum() > 0
    (ckpt,) = sorted((run / "checkpoints").glob("step_*"))
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load posix.system"):
        load_teacher_backbone(run)
    assert not marker.exists()

    planner = SafeLoadPlanner()  # the non-tensor items (optimizer param groups)
    planner.flatten_state_dict, planner.state_dict = False, {}
    item = type("ReadItem", (), {"dest_index": type("Index", (), {"fqn": "x"})()})()
    good = io.BytesIO()
    torch.save({"lr": 0.5, "betas": (0.9, 0.99), "params": [0, 1], "fused": None}, good)
    good.seek(0)
    planner.load_bytes(item, good)
    assert planner.state_dict["x"] == {
        "lr": 0.5,
        "betas": (0.9, 0.99),
        "params": [0, 1],
        "fused": None,
    }
    bad = io.BytesIO()
    torch.save(_Payload(marker), bad)
    bad.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(item, bad)
    assert not marker.exists()
