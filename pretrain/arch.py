"""Student/teacher meta-architecture: backbone + DINO head (+ iBOT head), and the loss glue.

Student and teacher are the same `SSLModel`; the teacher is an EMA of the student, gets no
gradients and sees only the global crops. One `forward` per model so that FSDP2's root hooks
gather the root-owned parameters (patch embedding, tokens, final norm) on every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from pretrain.config import TrainConfig
from pretrain.layers import DINOHead
from pretrain.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from pretrain.models import build_backbone


class SSLModel(nn.Module):
    def __init__(self, cfg: TrainConfig, drop_path_rate: float, distill_dim: int = 0) -> None:
        super().__init__()
        m, h = cfg.model, cfg.head
        self.backbone = build_backbone(
            m.arch,
            patch_size=m.patch_size,
            num_register_tokens=m.num_register_tokens,
            img_size=cfg.crops.global_crops_size,
            drop_path_rate=drop_path_rate,
            layerscale_init=m.layerscale_init,
            ffn_layer=m.ffn_layer,
            attn_backend=m.attn_backend,
            embed_dim=m.embed_dim,
            depth=m.depth,
            num_heads=m.num_heads,
            lora_rank=m.lora_rank,
            lora_alpha=m.lora_alpha,
        )
        dim = self.backbone.embed_dim
        self.dino_head = DINOHead(dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers)
        self.ibot_head = (
            DINOHead(dim, h.ibot_out_dim, h.hidden_dim, h.bottleneck_dim, h.nlayers)
            if h.separate_ibot_head
            else None
        )
        # Feature distillation: the student's tokens projected to the teacher's width.
        self.distill_proj = nn.Linear(dim, distill_dim) if distill_dim else None

    def forward(
        self,
        global_crops: Tensor,
        local_crops: Tensor | None,
        masks: Tensor | None,
        mask_indices: Tensor,
        features_only: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (global CLS [2B, D], CLS logits [2B + nL*B, K], masked-patch logits [M, K]);
        with features_only, (global CLS [2B, D'], global patch tokens [2B, N, D'], empty), D'
        the distillation projection's width where there is one."""
        crops = [global_crops] if local_crops is None else [global_crops, local_crops]
        crop_masks = [masks] if local_crops is None else [masks, None]
        outputs = self.backbone.forward_features(crops, masks=crop_masks)
        if features_only:  # inside forward: FSDP2 has the root's parameters gathered here
            cls, patches = outputs[0]["x_norm_clstoken"], outputs[0]["x_norm_patchtokens"]
            if self.distill_proj is not None:
                cls, patches = self.distill_proj(cls), self.distill_proj(patches)
            return cls, patches, cls.new_zeros(0)
        global_cls = outputs[0]["x_norm_clstoken"]  # [2B, D]
        cls_tokens = torch.cat([o["x_norm_clstoken"] for o in outputs])  # [2B + nL*B, D]
        patches = outputs[0]["x_norm_patchtokens"]  # [2B, N, D]
        masked = patches.flatten(0, 1).index_select(0, mask_indices)  # [M, D]
        if self.ibot_head is None:
            # One head call over CLS and masked patches: [2B + nL*B + M, K], then split.
            logits = self.dino_head(torch.cat([cls_tokens, masked]))
            return global_cls, logits[: len(cls_tokens)], logits[len(cls_tokens) :]
        return global_cls, self.dino_head(cls_tokens), self.ibot_head(masked)


def build_losses(cfg: TrainConfig) -> nn.ModuleDict:
    lc, h = cfg.loss, cfg.head
    ibot_dim = h.ibot_out_dim if h.separate_ibot_head else h.out_dim
    return nn.ModuleDict(
        {
            "dino": DINOLoss(h.out_dim, lc.student_temp, lc.center_momentum),
            "ibot": IBOTPatchLoss(ibot_dim, lc.student_temp, lc.center_momentum),
            "koleo": KoLeoLoss(),
        }
    )


def build_student_teacher(cfg: TrainConfig, distill_dim: int = 0) -> tuple[SSLModel, SSLModel]:
    student = SSLModel(cfg, cfg.model.drop_path_rate, distill_dim)
    teacher = SSLModel(cfg, 0.0, distill_dim)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    set_trainable(student, cfg)
    return student, teacher


def trainable_backbone_names(backbone: nn.Module, cfg: TrainConfig) -> set[str]:
    """Names (in the backbone) of the parameters that train: all, or with
    model.trainable_blocks=N the last N blocks and the final norm, and with LoRA its low-rank
    factors (the weights they adapt stay frozen)."""
    m = cfg.model
    names = {name for name, _ in backbone.named_parameters()}
    if m.trainable_blocks < 0 and not m.lora_rank:
        return names
    depth = backbone.n_blocks
    keep = max(0, min(m.trainable_blocks, depth)) if m.trainable_blocks >= 0 else 0
    open_blocks = {f"blocks.{i}." for i in range(depth - keep, depth)}
    chosen = {
        n for n in names if any(n.startswith(b) for b in open_blocks) or n.startswith("norm.")
    }
    if m.trainable_blocks < 0 and m.lora_rank:
        chosen = set()  # LoRA alone: only the low-rank factors train
    return chosen | {n for n in names if "_lora_" in n}


def set_trainable(student: SSLModel, cfg: TrainConfig) -> None:
    """Freeze what model.trainable_blocks and model.lora_rank leave out (heads always train):
    frozen parameters get no gradient and are left out of the optimizer."""
    open_names = trainable_backbone_names(student.backbone, cfg)
    for name, param in student.backbone.named_parameters():
        param.requires_grad_(name in open_names)


@dataclass
class LossTerms:
    total: Tensor
    dino: Tensor
    ibot: Tensor
    koleo: Tensor


def _teacher_targets(
    teacher: SSLModel, losses: nn.ModuleDict, batch: dict, temp: float, centering: str
) -> tuple[list[Tensor], Tensor]:
    """Teacher probabilities: the 2 global crops' CLS [B, K] each, masked patches [M, K]."""
    with torch.no_grad():
        _, cls_logits, patch_logits = teacher(
            batch["collated_global_crops"], None, None, batch["mask_indices_list"]
        )
        if centering == "sinkhorn_knopp":
            cls_probs = losses["dino"].sinkhorn_knopp_teacher(cls_logits, temp)
            patch_probs = losses["ibot"].sinkhorn_knopp_teacher(
                patch_logits, temp, n_masked_patches=batch["n_masked_patches"]
            )
        else:
            cls_probs = losses["dino"].softmax_center_teacher(cls_logits, temp)
            patch_probs = losses["ibot"].softmax_center_teacher(patch_logits, temp)
            losses["dino"].update_center(cls_logits)
            losses["ibot"].update_center(patch_logits)
    return list(cls_probs.chunk(2)), patch_probs


def feature_distill_losses(student: SSLModel, target: SSLModel, batch: dict) -> LossTerms:
    """Cosine distance of the student's projected CLS and patch tokens to a frozen teacher's,
    on the global crops (unmasked; the same patch grid for both)."""
    crops, empty = batch["collated_global_crops"], batch["mask_indices_list"][:0]
    with torch.no_grad():
        t_cls, t_patches, _ = target(crops, None, None, empty, features_only=True)
    s_cls, s_patches, _ = student(crops, None, None, empty, features_only=True)
    cls = 1 - F.cosine_similarity(s_cls.float(), t_cls.float(), dim=-1).mean()
    patches = 1 - F.cosine_similarity(s_patches.float(), t_patches.float(), dim=-1).mean()
    zero = cls.new_zeros(())
    return LossTerms(total=cls + patches, dino=cls, ibot=patches, koleo=zero)


def compute_losses(
    student: SSLModel,
    teacher: SSLModel,
    losses: nn.ModuleDict,
    batch: dict,
    teacher_temp: float,
    cfg: TrainConfig,
    target: SSLModel | None = None,
) -> LossTerms:
    """The step's losses. `target`: a frozen distillation teacher, whose heads give the DINO and
    iBOT targets (distill.mode=dino) or whose tokens the student's learn (features) in place of
    the EMA teacher's."""
    if target is not None and getattr(target, "distill_mode", "dino") == "features":
        return feature_distill_losses(student, target, batch)
    n_local = cfg.crops.local_crops_number
    teacher_probs, teacher_patch_probs = _teacher_targets(
        target if target is not None else teacher, losses, batch, teacher_temp, cfg.loss.centering
    )
    local_crops = batch["collated_local_crops"] if n_local > 0 else None
    global_cls, cls_logits, patch_logits = student(
        batch["collated_global_crops"],
        local_crops,
        batch["collated_masks"],
        batch["mask_indices_list"],
    )
    student_logits = list(cls_logits.chunk(2 + n_local))  # globals first, then locals
    dino = losses["dino"](student_logits, teacher_probs)
    # Averaged over every global crop, unmasked ones counting zero, as the DINOv2 recipe does.
    ibot = losses["ibot"].forward_masked(
        patch_logits,
        teacher_patch_probs,
        batch["masks_weight"],
        n_global_crops=batch["collated_global_crops"].shape[0],
    )
    koleo = sum(losses["koleo"](cls) for cls in global_cls.chunk(2))
    lc = cfg.loss
    total = lc.dino_weight * dino + lc.ibot_weight * ibot + lc.koleo_weight * koleo
    return LossTerms(total=total, dino=dino, ibot=ibot, koleo=koleo)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _reshard(model: nn.Module) -> None:
    """Register FSDP2's sharded parameters again (a no-op where they already are). After a
    forward with `reshard_after_forward=False` and no backward since, a module still holds the
    unsharded copies: writing them would not reach the sharded weights."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def update_teacher(student: SSLModel, teacher: SSLModel, momentum: float) -> None:
    """teacher = m * teacher + (1 - m) * student, on each rank's local shards."""
    _reshard(student)
    _reshard(teacher)
    s_params = [_local(p) for p in student.parameters()]
    t_params = [_local(p) for p in teacher.parameters()]
    if len(s_params) != len(t_params):
        raise RuntimeError("student and teacher have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def model_signature(model: SSLModel, cfg: TrainConfig) -> dict:
    """What a checkpoint must agree on to be loadable into this model."""
    bb = model.backbone
    return {
        "arch": cfg.model.arch,
        "embed_dim": bb.embed_dim,
        "n_blocks": bb.n_blocks,
        "patch_size": bb.patch_size,
        "num_register_tokens": bb.num_register_tokens,
        "out_dim": cfg.head.out_dim,
    }
