"""DINOv2 pretraining under torchrun with FSDP2. Rerunning the same command resumes.

    torchrun --standalone --nproc-per-node 2 -m pretrain.train \\
        --config configs/pretrain/vit_test_cpu.yaml data.shards='RUN/curated/shards/*.tar' \\
        output_dir=TRAIN train.steps=200
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import arch, checkpoint, optim
from pretrain.config import TrainConfig, load_train_config
from pretrain.configtools import save_config, to_dict
from pretrain.data.loader import build_pretrain_loader
from pretrain.distill import DistillTeacher, build_target, read_teacher
from pretrain.export import EXPORT_NAME, export_teacher
from pretrain.logging_utils import MetricsLogger, setup_logging, train_flops_per_image
from pretrain.loop import run_steps
from pretrain.parallelize import build_mesh, init_distributed, parallelize
from pretrain.pretrained import PretrainedWeights, apply_pretrained, read_pretrained

log = logging.getLogger("pretrain.train")


def prepare_output_dir(cfg: TrainConfig, rank: int) -> Path:
    """Refuse another run's output dir; save this run's config (rank 0)."""
    out = Path(cfg.output_dir)
    saved = out / "config.yaml"
    if saved.is_file():  # every rank checks, so a mismatch fails everywhere, not in a barrier
        allowed = list(cfg.checkpoint.allowed_changes)
        checkpoint.check_run_config(
            saved.read_text(), to_dict(cfg), allowed, out, defaults=to_dict(TrainConfig())
        )
    dist.barrier()
    if rank == 0:
        save_config(cfg, saved)
    return out


def fresh_start(cfg: TrainConfig) -> bool:
    """No checkpoint to resume from in output_dir (model.pretrained is read only then)."""
    return checkpoint.latest_checkpoint(Path(cfg.output_dir) / "checkpoints") is None


@dataclass
class Job:
    student: arch.SSLModel
    teacher: arch.SSLModel
    losses: torch.nn.ModuleDict
    optimizer: torch.optim.Optimizer
    schedules: optim.Schedules
    target: arch.SSLModel | None  # the frozen distillation teacher, if any


def build_job(
    cfg: TrainConfig,
    device: torch.device,
    world: int,
    pretrained: PretrainedWeights | None = None,
    distill_teacher: DistillTeacher | None = None,
) -> Job:
    """The models (started from `pretrained`, sharded with FSDP2 over the world's mesh), the
    losses, AdamW and the schedules of one training run; the process group exists already."""
    features = distill_teacher is not None and distill_teacher.mode == "features"
    student, teacher = arch.build_student_teacher(
        cfg, distill_dim=distill_teacher.width if features else 0
    )
    if pretrained is not None:
        apply_pretrained(student, teacher, pretrained)
    log_trainable(student, cfg)
    losses = arch.build_losses(cfg).to(device)
    mesh = build_mesh(device, world)
    parallelize(student, cfg.dist, device, mesh, train=True)
    parallelize(teacher, cfg.dist, device, mesh, train=False)
    target = None
    if distill_teacher is not None:
        target = parallelize(build_target(distill_teacher), cfg.dist, device, mesh, train=False)
    optimizer = optim.build_optimizer(student, cfg.optim, student.backbone.n_blocks)
    schedules = optim.Schedules(cfg.optim, cfg.train, cfg.data.batch_size_per_rank * world)
    return Job(student, teacher, losses, optimizer, schedules, target)


def train(
    cfg: TrainConfig,
    pretrained: PretrainedWeights | None = None,
    distill_teacher: DistillTeacher | None = None,
) -> None:
    rank, world, device = init_distributed(cfg.dist)
    setup_logging(rank)
    out = prepare_output_dir(cfg, rank)
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    job = build_job(cfg, device, world, pretrained, distill_teacher)
    student, teacher, losses, optimizer = job.student, job.teacher, job.losses, job.optimizer
    schedules, target, n_blocks = job.schedules, job.target, student.backbone.n_blocks
    signature = arch.model_signature(student, cfg)

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
    loader, n_shards = build_pretrain_loader(
        cfg, rank=rank, world_size=world, start_batch=start, device_type=device.type
    )
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
        cfg, student, teacher, losses, optimizer, schedules, loader, logger, start, meta, device,
        target=target,
    )  # fmt: skip
    if cfg.train.stop_after == 0 or cfg.train.stop_after >= cfg.train.steps:
        path = export_teacher(teacher, cfg, out / EXPORT_NAME)
        if path is not None:
            log.info("exported the teacher backbone to %s", path)
    logger.close()


def log_trainable(student: arch.SSLModel, cfg: TrainConfig) -> None:
    """One line: what trains, and the knobs of continued pretraining that decide it."""
    params = list(student.backbone.parameters())
    open_count = sum(p.numel() for p in params if p.requires_grad)
    m, t, o = cfg.model, cfg.train, cfg.optim
    log.info(
        "backbone: %d of %d parameters train (trainable_blocks=%d, lora_rank=%d); frozen for "
        "the first %d steps, then lr x%g with a %d-step warm-up; pretrained=%s",
        open_count, sum(p.numel() for p in params), m.trainable_blocks, m.lora_rank,
        t.freeze_backbone_steps, o.backbone_lr_mult, o.backbone_warmup_steps, m.pretrained or "-",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DINOv2 pretraining (run under torchrun)")
    parser.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=200")
    args = parser.parse_args(argv)
    cfg = load_train_config(args.config, args.overrides)
    # Before any process group: a bad model.pretrained is one clear error, not one per rank
    # inside a collective.
    pretrained = read_pretrained(cfg) if fresh_start(cfg) else None
    distill_teacher = read_teacher(cfg)  # every run: the targets come from it
    try:
        train(cfg, pretrained, distill_teacher)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
