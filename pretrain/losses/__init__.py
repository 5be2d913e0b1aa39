"""The three DINOv2 objectives: DINO (CLS), iBOT (masked patches) and the KoLeo regulariser."""

from pretrain.losses.dino_clstoken_loss import DINOLoss
from pretrain.losses.ibot_patch_loss import IBOTPatchLoss
from pretrain.losses.koleo_loss import KoLeoLoss
from pretrain.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp"]
