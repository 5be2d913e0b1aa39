"""Distillation into a student of another size: `distill.teacher=PATH`.

- A dinoforge run directory with checkpoints (`distill.mode=dino`, the default for one): its
  teacher, heads included, frozen; its DINO and iBOT probabilities on the global crops are the
  student's targets in place of the EMA teacher's, as DINOv2 distils ViT-g into smaller models.
  The student's heads must have the run's head sizes (head.out_dim, ...).
- A backbone file (official DINOv2 layout, or a run's export; `features`): the frozen
  backbone's CLS and patch tokens of the global crops; the student's, through a learned linear
  projection to the teacher's width, learn them by cosine distance.

The student keeps its own EMA teacher, which is what the run exports. Teacher and student
must share the patch size (iBOT's targets and the patch tokens are compared position by
position). `read_teacher` runs before any process group, like `pretrain.pretrained`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from torch import Tensor

from pretrain.config import TrainConfig
from pretrain.models.dinov2_checkpoint import (
    dinov2_arch_from_state_dict,
    read_num_heads,
    read_state_dict,
)
from pretrain.pretrained import PretrainedError, _resample_positions, _run_teacher_state

log = logging.getLogger(__name__)


@dataclass
class DistillTeacher:
    mode: str  # dino | features
    cfg: TrainConfig  # builds the frozen teacher model
    state: dict[str, Tensor]  # its SSLModel state dict
    width: int  # its embedding width (the student's projection target in features mode)


def _teacher_cfg(cfg: TrainConfig, **model: object) -> TrainConfig:
    """This run's config with the teacher's backbone (tiny heads: features mode uses none)."""
    t = OmegaConf.merge(cfg, {"model": {"embed_dim": 0, "depth": 0, "num_heads": 0, "lora_rank": 0,
                                        "trainable_blocks": -1, "pretrained": "", **model},
                              "head": {"out_dim": 8, "ibot_out_dim": 8, "hidden_dim": 8,
                                       "bottleneck_dim": 8, "separate_ibot_head": False}})  # fmt: skip
    return t


def read_teacher(cfg: TrainConfig) -> DistillTeacher | None:
    """The frozen teacher distill.teacher names, checked against this run; None if unset."""
    source = cfg.distill.teacher
    if not source:
        return None
    path = Path(source)
    if not path.exists():
        raise PretrainedError(f"distill.teacher={source}: no such file or directory")
    has_run = path.is_dir() and any((path / "checkpoints").glob("step_*"))
    mode = cfg.distill.mode if cfg.distill.mode != "auto" else ("dino" if has_run else "features")
    if mode == "dino":
        if not has_run:
            raise PretrainedError(
                f"distill.teacher={source}: distill.mode=dino needs a run directory with "
                "checkpoints (its heads give the targets); a backbone file takes distill.mode=features"
            )
        from pretrain.export import run_config

        t_cfg = run_config(path)
        state, _ = _run_teacher_state(path)
        mismatch = [f"head.{k}: run {t_cfg.head[k]}, this config {cfg.head[k]}"
                    for k in ("out_dim", "ibot_out_dim", "separate_ibot_head")
                    if t_cfg.head[k] != cfg.head[k]]  # fmt: skip
        if mismatch:
            raise PretrainedError(
                f"distill.teacher={source}: the student's heads must have the teacher's sizes "
                f"for DINO targets: {'; '.join(mismatch)}"
            )
        t_cfg = OmegaConf.merge(t_cfg, {"crops": cfg.crops})  # this run's crop geometry
        grid = cfg.crops.global_crops_size // t_cfg.model.patch_size
        state["backbone.pos_embed"] = _resample_positions(state["backbone.pos_embed"], grid)
    else:
        try:
            file = path / "teacher_backbone.safetensors" if path.is_dir() else path
            backbone = read_state_dict(file)
            arch = dinov2_arch_from_state_dict(backbone, num_heads=read_num_heads(file))
        except (OSError, ValueError, KeyError) as exc:
            raise PretrainedError(f"distill.teacher={source}: {exc}") from exc
        t_cfg = _teacher_cfg(cfg, arch=arch["name"], patch_size=arch["patch_size"],
                             num_register_tokens=arch["num_register_tokens"],
                             ffn_layer=arch["ffn_layer"],
                             **{k: arch[k] for k in ("embed_dim", "depth", "num_heads") if k in arch})  # fmt: skip
        grid = cfg.crops.global_crops_size // arch["patch_size"]
        backbone["pos_embed"] = _resample_positions(backbone["pos_embed"], grid)
        state = {f"backbone.{k}": v for k, v in backbone.items()}
    if t_cfg.model.patch_size != cfg.model.patch_size:
        raise PretrainedError(
            f"distill.teacher={source}: patch {t_cfg.model.patch_size}, the student's "
            f"{cfg.model.patch_size}: they must match (targets are compared patch by patch)"
        )
    width = state["backbone.cls_token"].shape[-1]
    log.info("distilling from %s (%s, %s, width %d)", source, mode, t_cfg.model.arch, width)
    return DistillTeacher(mode=mode, cfg=t_cfg, state=state, width=width)


def build_target(teacher: DistillTeacher):
    """The frozen teacher model (unsharded, on the CPU; the caller parallelizes it)."""
    from pretrain.arch import SSLModel

    model = SSLModel(teacher.cfg, 0.0)
    own = model.state_dict()
    if teacher.mode == "features":  # heads unused: keep the tiny ones as built
        state = {**{k: v for k, v in own.items() if not k.startswith("backbone.")}, **teacher.state}
    else:
        state = teacher.state
    model.load_state_dict(state)
    model.requires_grad_(False)
    model.distill_mode = teacher.mode  # what compute_losses asks of it
    return model.eval()
