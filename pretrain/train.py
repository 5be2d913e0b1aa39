"""DINOv2 pretraining under torchrun with FSDP2. Rerunning the same command resumes.

    torchrun --standalone --nproc-per-node 2 -m pretrain.train \\
        --config configs/pretrain/vit_test_cpu.yaml data.shards='RUN/curated/shards/*.tar' \\
        output_dir=TRAIN train.steps=200
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import arch, checkpoint, optim
from pretrain.config import TrainConfig, load_train_config
from pretrain.configtools import save_config, to_dict
from pretrain.data.loader import build_pretrain_loader
from pretrain.export import EXPORT_NAME, export_teacher
from pretrain.logging_utils import MetricsLogger, setup_logging, train_flops_per_image
from pretrain.parallelize import build_mesh, init_distributed, parallelize

log = logging.getLogger("pretrain.train")


def prepare_output_dir(cfg: TrainConfig, rank: int) -> Path:
    """Refuse another run's output dir; save this run's config (rank 0)."""
    out = Path(cfg.output_dir)
    saved = out / "config.yaml"
    if saved.is_file():  # every rank checks, so a mismatch fails everywhere, not in a barrier
        allowed = list(cfg.checkpoint.allowed_changes)
        checkpoint.check_run_config(saved.read_text(), to_dict(cfg), allowed, out)
    dist.barrier()
    if rank == 0:
        save_config(cfg, saved)
    return out


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def _reduced(terms: arch.LossTerms, stats: dict[str, int], device: torch.device) -> dict:
    """Losses averaged and corrupt-input counts summed over ranks."""
    losses = torch.stack([terms.total, terms.dino, terms.ibot, terms.koleo]).detach().float()
    counts = torch.tensor([stats["corrupt_samples"], stats["corrupt_tars"]], device=device)
    dist.all_reduce(losses)
    dist.all_reduce(counts)
    losses /= dist.get_world_size()
    names = ("loss", "dino_loss", "ibot_loss", "koleo_loss")
    return {
        **dict(zip(names, losses.tolist())),
        "corrupt_samples": int(counts[0]),
        "corrupt_tars": int(counts[1]),
    }


def train(cfg: TrainConfig) -> None:
    rank, world, device = init_distributed(cfg.dist)
    setup_logging(rank)
    out = prepare_output_dir(cfg, rank)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    student, teacher = arch.build_student_teacher(cfg)
    losses = arch.build_losses(cfg).to(device)
    signature = arch.model_signature(student, cfg)
    mesh = build_mesh(device, world)
    parallelize(student, cfg.dist, device, mesh, train=True)
    parallelize(teacher, cfg.dist, device, mesh, train=False)
    n_blocks = student.backbone.n_blocks
    optimizer = optim.build_optimizer(student, cfg.optim, n_blocks)
    schedules = optim.Schedules(cfg.optim, cfg.train, cfg.data.batch_size_per_rank * world)

    ckpt_dir = out / "checkpoints"
    checkpoint.sweep_partial_saves(ckpt_dir)
    latest = checkpoint.latest_checkpoint(ckpt_dir)
    start = 0
    torch.manual_seed(cfg.train.seed + 1000 * rank)  # drop path differs per rank
    if latest is not None:
        meta = checkpoint.load_checkpoint(
            latest, student=student, teacher=teacher, optimizer=optimizer, losses=losses,
            model_signature=signature,
        )  # fmt: skip
        start = meta["step"]
        log.info("resumed from %s at step %d", latest, start)
    meta = {"model": signature, "batch_size_per_rank": cfg.data.batch_size_per_rank}
    loader, n_shards = build_pretrain_loader(cfg, rank=rank, world_size=world, start_batch=start)
    log.info(
        "%d shards, %d ranks, global batch %d",
        n_shards,
        world,
        cfg.data.batch_size_per_rank * world,
    )
    c = cfg.crops
    flops = train_flops_per_image(
        n_blocks, student.backbone.embed_dim, cfg.model.patch_size, c.global_crops_size,
        c.local_crops_size, c.local_crops_number, cfg.model.num_register_tokens,
    )  # fmt: skip
    logger = MetricsLogger(
        out, rank=rank, total_steps=cfg.train.steps, start_step=start,
        tensorboard=cfg.logging.tensorboard, flops_per_image=flops, world_size=world,
    )  # fmt: skip
    run_steps(
        cfg, student, teacher, losses, optimizer, schedules, loader, logger, start, meta, device
    )
    if cfg.train.stop_after == 0 or cfg.train.stop_after >= cfg.train.steps:
        path = export_teacher(teacher, cfg, out / EXPORT_NAME)
        if path is not None:
            log.info("exported the teacher backbone to %s", path)
    logger.close()


def run_steps(
    cfg, student, teacher, losses, optimizer, schedules, loader, logger, start, meta, device
):
    tc = cfg.train
    end = min(tc.steps, tc.stop_after) if tc.stop_after > 0 else tc.steps
    batches, images_since_log = iter(loader), 0
    params = [p for p in student.parameters() if p.requires_grad]
    for step in range(start, end):
        batch = _to_device(next(batches), device)
        values = schedules.at(step)
        optim.apply_step_values(optimizer, values)
        terms = arch.compute_losses(student, teacher, losses, batch, values.teacher_temp, cfg)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        optimizer.step()
        arch.update_teacher(student, teacher, values.momentum)
        done = step + 1
        images_since_log += cfg.data.batch_size_per_rank * dist.get_world_size()
        if done % tc.log_every == 0 or done == end:
            record = _reduced(terms, batch["stream_stats"], device)
            record.update(
                vars(values),
                grad_norm=float(
                    grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                ),
            )
            logger.log(done, record, images_since_log)
            images_since_log = 0
        if done % tc.checkpoint_every == 0 or done == end:
            checkpoint.save_checkpoint(
                Path(cfg.output_dir) / "checkpoints", done, student=student, teacher=teacher,
                optimizer=optimizer, losses=losses, meta=meta, keep_last=cfg.checkpoint.keep_last,
            )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DINOv2 pretraining (run under torchrun)")
    parser.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=200")
    args = parser.parse_args(argv)
    cfg = load_train_config(args.config, args.overrides)
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
