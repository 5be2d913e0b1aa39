"""Export the teacher backbone to safetensors in the official DINOv2 key layout.

    python -m pretrain.export --checkpoint TRAIN [--output TRAIN/teacher_backbone.safetensors]

Inside training, `export_teacher` gathers the sharded teacher (a collective call) and rank 0
writes the file. Offline, `load_teacher_backbone` reads a run's latest DCP checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pretrain import dcp_safe
from pretrain.config import TrainConfig
from pretrain.configtools import load_config
from pretrain.models.loading import EXPORT_NAME


def backbone_from_config(cfg: TrainConfig) -> nn.Module:
    from pretrain.arch import SSLModel

    return SSLModel(cfg, 0.0).backbone


def save_backbone(backbone: nn.Module, path: str | Path) -> Path:
    """Write the backbone in the DINOv2 layout, atomically (the core's writer)."""
    backbone.save_dinov2_checkpoint(path)
    return Path(path)


def export_teacher(teacher: nn.Module, cfg: TrainConfig, path: str | Path) -> Path | None:
    """Collective: gathers the full teacher; rank 0 writes it. Returns the path on rank 0."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(teacher, options=options)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    backbone = backbone_from_config(cfg)
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)})
    return save_backbone(backbone, path)


def run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training output dir: no config.yaml")
    return load_config(TrainConfig, path)


def load_teacher_backbone(run_dir: str | Path) -> nn.Module:
    """The teacher backbone of a run: its export if present, else its latest DCP checkpoint."""
    from pretrain.arch import SSLModel
    from pretrain.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    teacher = SSLModel(cfg, 0.0)
    exported = run_dir / EXPORT_NAME
    if exported.is_file():
        teacher.backbone.load_dinov2_checkpoint(exported)
        return teacher.backbone
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} holds neither {EXPORT_NAME} nor a checkpoint")
    state = {"teacher": teacher.state_dict()}
    dcp_safe.load(state, ckpt)  # no process group: reads every shard here
    teacher.load_state_dict(state["teacher"])
    return teacher.backbone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="export a run's teacher backbone (DINOv2 keys)")
    parser.add_argument("--checkpoint", required=True, help="training output_dir")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    backbone = load_teacher_backbone(args.checkpoint)
    out = save_backbone(backbone, args.output or Path(args.checkpoint) / EXPORT_NAME)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
