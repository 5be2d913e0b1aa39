"""The FSDP2-sharded teacher after EMA updates, over 2 gloo ranks, with the student's
`dist.reshard_after_forward` on and off: its gathered weights are m * teacher + (1 - m) * student
of the plain weights, and its forward equals a plain (unsharded) model holding those weights.
With the setting off, FSDP2 keeps a module's unsharded parameters registered after a forward;
a teacher sharded that way left the EMA writing the wrong tensors (it runs no backward, which
is what would reshard them): the teacher is now always resharded after its forward, and
`update_teacher` reshards what is not (`unsharded_teacher`: a teacher sharded the old way)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.arch import SSLModel
from pretrain.config import load_train_config

WORKER = Path(__file__).with_name("teacher_reshard_worker.py")
MOMENTUM, ROUNDS = 0.9, 2


@pytest.mark.parametrize("mode", ["reshard", "no_reshard", "unsharded_teacher"])
def test_teacher_after_ema_equals_plain_models(tmp_path, helpers, mode):
    torch.manual_seed(1)
    n_patches = (56 // 14) ** 2
    inputs = {
        "config": str(helpers.config),
        "momentum": MOMENTUM,
        "rounds": ROUNDS,
        "global_crops": torch.randn(4, 3, 56, 56),  # 2 global crops x batch 2
        "mask_indices": torch.tensor([0, 3, 7, 16, 21, 40, 63]),  # into [4 * 16] patch rows
    }
    assert int(inputs["mask_indices"].max()) < 4 * n_patches
    torch.save(inputs, tmp_path / "inputs.pt")
    port = helpers.free_port()
    env = {**helpers.run_env(), "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), "2", str(port), str(tmp_path), mode],
            env=env,
            cwd=helpers.repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=180)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], "\n".join(s[-4000:] for s in logs)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    plain = per_rank[0]["plain"]

    cfg = load_train_config(str(helpers.config), ["data.shards=x", f"output_dir={tmp_path}/r"])
    model = SSLModel(cfg, 0.0).eval()
    names = [n for n, _ in model.named_parameters()]
    expected = {n: plain["teacher"][n].clone() for n in names}
    for step in range(ROUNDS + 1):
        model.load_state_dict({**plain["teacher"], **expected})
        with torch.no_grad():
            reference = model(inputs["global_crops"], None, None, inputs["mask_indices"])
        for result in per_rank:
            got = result["weights"][step]
            assert sorted(got) == sorted(names)
            for name in names:
                torch.testing.assert_close(got[name], expected[name], msg=f"{step=} {name}")
            for out, ref in zip(result["outputs"][step], reference, strict=True):
                torch.testing.assert_close(out, ref, msg=f"teacher output after {step} updates")
        # the next EMA update, on plain tensors (the student does not change in between)
        expected = {n: MOMENTUM * expected[n] + (1 - MOMENTUM) * plain["student"][n] for n in names}
    # the updates moved the teacher (else the comparison above would prove nothing)
    moved = per_rank[0]["weights"][-1]
    assert any(not torch.equal(moved[n], plain["teacher"][n]) for n in names)
