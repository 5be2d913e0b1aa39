"""Start training from released weights: `model.pretrained=PATH`.

PATH is an official DINOv2 backbone file (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`), a
`.safetensors` in that layout (a dinoforge export), or a dinoforge training run directory, whose
teacher is taken whole (backbone and DINO/iBOT heads, from its latest checkpoint; its export,
backbone only, when it has no checkpoint). The file must fit the configured model exactly:
strict keys and shapes, one error naming the file and the keys (with hints: registers, feed-
forward, depth). Its position embeddings are resampled from the file's grid (37 x 37 for the
official files, trained at 518 px) to the model's (the global crop over the patch), once, as
DINOv2 does when it trains at another resolution; the forward then interpolates to the local
crops as usual. The teacher starts equal to the student.

`read_pretrained` runs in `pretrain.train.main` before any process group starts, so that a
bad path or a mismatching file is one clear error; a resumed run takes its own checkpoint
and does not read the file again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pretrain.config import TrainConfig
from pretrain.configtools import ConfigError
from pretrain.models.dinov2_checkpoint import check_dinov2_state_dict, read_state_dict
from pretrain.models.loading import EXPORT_NAME
from pretrain.models.vision_transformer import interpolate_pos_embed

log = logging.getLogger(__name__)


class PretrainedError(ConfigError):
    """model.pretrained names nothing usable for this model."""


@dataclass
class PretrainedWeights:
    source: str
    backbone: dict[str, Tensor]  # the model's own key names and shapes (pos_embed resampled)
    heads: dict[str, Tensor] | None  # "dino_head.*" / "ibot_head.*", from a run directory


def _run_teacher_state(run_dir: Path) -> tuple[dict[str, Tensor], bool]:
    """(teacher SSLModel state, whether it holds heads) of a dinoforge run directory."""
    from pretrain import dcp_safe
    from pretrain.arch import SSLModel
    from pretrain.checkpoint import latest_checkpoint
    from pretrain.export import run_config

    cfg = run_config(run_dir)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        exported = run_dir / EXPORT_NAME
        if not exported.is_file():
            raise PretrainedError(
                f"model.pretrained={run_dir}: the run holds neither a checkpoint nor {EXPORT_NAME}"
            )
        log.info("%s has no checkpoint: its exported backbone, new heads", run_dir)
        return {f"backbone.{k}": v for k, v in read_state_dict(exported).items()}, False
    with torch.device("meta"):
        shapes = SSLModel(cfg, 0.0).state_dict()
    state = {"teacher": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}}
    dcp_safe.load(state, ckpt)  # no process group: every shard is read here
    log.info("model.pretrained: the teacher of %s (backbone and heads)", ckpt)
    return state["teacher"], True


def _merge_lora(state: dict[str, Tensor], cfg_of_run: TrainConfig | None) -> dict[str, Tensor]:
    """A run trained with LoRA: its factors folded into the weights (the layout of an export)."""
    if not any("_lora_" in k for k in state):
        return state
    from pretrain.arch import SSLModel

    with torch.device("meta"):
        model = SSLModel(cfg_of_run, 0.0)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state)
    merged = {f"backbone.{k}": v for k, v in model.backbone.dinov2_state_dict().items()}
    return merged | {k: v for k, v in state.items() if not k.startswith("backbone.")}


def _resample_positions(pos: Tensor, grid: int) -> Tensor:
    native = math.isqrt(pos.shape[1] - 1)
    if native == grid:
        return pos
    log.info(
        "model.pretrained: position grid %d x %d resampled to %d x %d", native, native, grid, grid
    )
    # once, to the exact size (offset 0), antialiased: a down-sampled grid keeps its mean
    return interpolate_pos_embed(pos, (grid, grid), offset=0.0, antialias=True)


def read_pretrained(cfg: TrainConfig) -> PretrainedWeights | None:
    """The weights model.pretrained names, checked against the configured model; None if unset."""
    source = cfg.model.pretrained
    if not source:
        return None
    from pretrain.arch import SSLModel

    path = Path(source)
    if not path.exists():
        raise PretrainedError(f"model.pretrained={source}: no such file or directory")
    with torch.device("meta"):
        model = SSLModel(cfg, 0.0)  # shapes only: nothing allocated
    heads = None
    try:
        if path.is_dir():
            from pretrain.export import run_config

            state, with_heads = _run_teacher_state(path)
            state = _merge_lora(state, run_config(path))
            backbone = {
                k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")
            }
            if with_heads:
                heads = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        else:
            backbone = read_state_dict(path)
    except (OSError, ValueError, KeyError) as exc:
        raise PretrainedError(f"model.pretrained={source}: {exc}") from exc
    target = {k: v for k, v in model.backbone.state_dict().items() if "_lora_" not in k}
    try:
        check_dinov2_state_dict(_Shapes(target), backbone)
    except (KeyError, ValueError) as exc:
        raise PretrainedError(
            f"model.pretrained={source} does not fit model.arch={cfg.model.arch} "
            f"(patch {cfg.model.patch_size}, {cfg.model.num_register_tokens} registers):\n{exc}"
        ) from exc
    grid = cfg.crops.global_crops_size // cfg.model.patch_size
    backbone = dict(backbone, pos_embed=_resample_positions(backbone["pos_embed"], grid))
    if heads is not None:
        _check_heads(model, heads, source)
    return PretrainedWeights(source=str(source), backbone=backbone, heads=heads)


class _Shapes:
    """A stand-in module for check_dinov2_state_dict: its state dict is `shapes`."""

    def __init__(self, shapes: dict[str, Tensor]) -> None:
        self.shapes = shapes

    def state_dict(self) -> dict[str, Tensor]:
        return self.shapes


def _check_heads(model, heads: dict[str, Tensor], source: str) -> None:
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    missing, unexpected = sorted(set(expected) - set(heads)), sorted(set(heads) - set(expected))
    wrong = [
        f"{k}: run {tuple(heads[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in heads and tuple(heads[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        raise PretrainedError(
            f"model.pretrained={source}: the run's heads do not fit this config's head.* "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {wrong[:4]}); "
            "set head.* as the run had them, or start from its exported backbone "
            f"({EXPORT_NAME}) for new heads"
        )


@torch.no_grad()
def apply_pretrained(student, teacher, weights: PretrainedWeights) -> None:
    """Load the weights into the (unsharded) student, then make the teacher its copy."""
    backbone = dict(weights.backbone)
    for key, value in student.backbone.state_dict().items():
        if "_lora_" in key:  # LoRA factors are this run's own: kept as built (B = 0)
            backbone[key] = value
    if weights.heads is None:
        student.backbone.load_state_dict(backbone)
    else:
        student.load_state_dict(
            {**{f"backbone.{k}": v for k, v in backbone.items()}, **weights.heads}
        )
    teacher.load_state_dict(student.state_dict())
    what = "backbone and heads" if weights.heads is not None else "backbone, new heads"
    log.info("started from %s (%s)", weights.source, what)
