"""One rank of the 2-process loss test (run as a script by test_distributed_losses.py).

argv: rank world_size port work_dir. Reads work_dir/inputs.pt, takes this rank's rows, runs the
teacher normalisations and centre updates inside a gloo process group, writes work_dir/rank{r}.pt.
"""

import sys

import torch
import torch.distributed as dist

from pretrain.losses import DINOLoss, IBOTPatchLoss


def main() -> None:
    rank, world_size, port, work_dir = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
    )
    inputs = torch.load(f"{work_dir}/inputs.pt", weights_only=True)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        cls_rows = inputs["cls_logits"].chunk(world_size)[rank]
        patch_rows = inputs["patch_logits"][
            inputs["patch_bounds"][rank] : inputs["patch_bounds"][rank + 1]
        ]
        n_masked = torch.tensor([patch_rows.shape[0]])
        # pad this rank's patch rows as the training step does (an upper bound of masked tokens)
        padded = torch.cat([patch_rows, torch.full((2, patch_rows.shape[1]), 30.0)])

        dino, ibot = DINOLoss(cls_rows.shape[1]), IBOTPatchLoss(patch_rows.shape[1])
        result = {
            "dino_sk": dino.sinkhorn_knopp_teacher(cls_rows, teacher_temp=0.07),
            "ibot_sk": ibot.sinkhorn_knopp_teacher(padded, 0.07, n_masked)[: patch_rows.shape[0]],
        }
        dino.update_center(cls_rows)
        ibot.update_center(patch_rows)
        result["dino_center"] = dino.center
        result["ibot_center"] = ibot.center
        result["dino_centered"] = dino.softmax_center_teacher(cls_rows, teacher_temp=0.04)
        torch.save(result, f"{work_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
