"""Sinkhorn-Knopp teacher normalisation shared by the DINO and iBOT losses (SwAV, DINOv2)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pretrain.losses.distributed import all_reduce_


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor, teacher_temp: float, global_batch: Tensor | int, n_iterations: int = 3
) -> Tensor:
    """Soft assignments [B, K] whose rows each sum to 1 and whose prototypes share the global
    batch about equally, normalised across every rank's rows when a process group exists.

    global_batch is the number of rows summed over all ranks. Runs in fp32; the global maximum
    is subtracted before exp (it cancels in the normalisation) so that small temperatures
    cannot overflow.
    """
    logits = teacher_logits.float() / teacher_temp
    global_max = logits.max().detach().clone()
    all_reduce_(global_max, op=dist.ReduceOp.MAX)
    q = torch.exp(logits - global_max).t()  # [K, B]: prototypes x samples
    n_prototypes = q.shape[0]
    # A Python number divides as a scalar; a tensor is used where it is. Building a device
    # tensor from a number would copy from the host and wait for the stream.
    total = global_batch.to(q.dtype) if torch.is_tensor(global_batch) else float(global_batch)

    # A prototype whose exp() underflowed everywhere has a zero sum: clamping keeps it at zero
    # instead of dividing 0 by 0.
    tiny = torch.finfo(q.dtype).tiny
    q /= all_reduce_(q.sum())
    for _ in range(n_iterations):
        # Each prototype gets total mass 1/K over the global batch...
        q /= all_reduce_(q.sum(dim=1, keepdim=True)).clamp_(min=tiny)
        q /= n_prototypes
        # ...and each sample total mass 1/B.
        q /= q.sum(dim=0, keepdim=True).clamp_(min=tiny)
        q /= total
    q *= total  # every sample's assignment now sums to 1
    return q.t()  # [B, K]
