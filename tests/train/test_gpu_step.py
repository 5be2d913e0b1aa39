"""On CUDA, a training step never makes the host wait for the device: every op of the step runs
under torch.cuda.set_sync_debug_mode("error"), which raises at the first synchronising call
(.item(), a pageable copy, data-dependent indexing). Needs a CUDA device."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("photometric", ["device", "loader"])
def test_a_step_has_no_host_sync(shard_dir, helpers, tmp_path, monkeypatch, photometric):
    from pretrain import arch, optim
    from pretrain.config import load_train_config
    from pretrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
    from pretrain.data.loader import build_pretrain_loader
    from pretrain.data.photometric import batch_to_device
    from pretrain.parallelize import init_distributed
    from pretrain.train import build_job

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_train_config(str(helpers.config), [
        f"data.shards={shard_dir}/shapes-*.tar", f"output_dir={tmp_path}", "data.num_workers=1",
        f"crops.photometric={photometric}", "loss.centering=sinkhorn_knopp"])  # fmt: skip
    rank, world, device = init_distributed(cfg.dist)
    try:
        job = build_job(cfg, device, world)
        student, teacher, losses = job.student, job.teacher, job.losses
        opt, sched = job.optimizer, job.schedules
        loader, _ = build_pretrain_loader(
            cfg, rank=rank, world_size=world, start_batch=0, device_type="cuda"
        )
        batches = iter(loader)
        params = [p for p in student.parameters() if p.requires_grad]

        def step(i: int) -> None:
            batch = batch_to_device(next(batches), device, IMAGENET_MEAN, IMAGENET_STD)
            values = sched.at(i)
            optim.apply_step_values(opt, values)
            terms = arch.compute_losses(student, teacher, losses, batch, values.teacher_temp, cfg)
            opt.zero_grad(set_to_none=True)
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
            opt.step()
            arch.update_teacher(student, teacher, values.momentum)

        for i in range(2):  # warm: lazy inits, the attention probe, the constants' one copy
            step(i)
        next_batch = next(batches)  # the loader's own pinning thread is not the step
        batches = iter([next_batch])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.pop("RANK", None)
