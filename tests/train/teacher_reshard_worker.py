"""One rank of the teacher EMA test (run as a script by test_teacher_reshard.py).

argv: rank world_size port work_dir mode. mode: `reshard` or `no_reshard` (the value of
`dist.reshard_after_forward`), or `unsharded_teacher`: `no_reshard` with the teacher sharded as
the student is, so that `update_teacher` meets the unsharded parameters a forward left. Builds the
tiny student/teacher with the seed the test uses, shards both as training does, then per round:
a teacher forward, an EMA update with momentum work_dir/inputs.pt["momentum"]. Writes, on rank 0,
the plain weights before sharding and, on every rank, each round's teacher output and full
(gathered) weights to work_dir/rank{r}.pt; the test compares them with plain, unsharded models.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from pretrain import arch
from pretrain.config import load_train_config
from pretrain.parallelize import build_mesh, parallelize


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter gathered whole. After a teacher forward the module must hold its sharded
    DTensors again: a plain tensor here is a leftover unsharded copy the EMA would not see."""
    out = {}
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            raise AssertionError(f"{name} is registered unsharded ({type(p).__name__})")
        out[name] = p.full_tensor().detach().clone()
    return out


def main() -> None:
    rank, world_size, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    work_dir, mode = sys.argv[4], sys.argv[5]
    reshard = mode == "reshard"
    inputs = torch.load(f"{work_dir}/inputs.pt", weights_only=True)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        cfg = load_train_config(
            inputs["config"],
            ["data.shards=x", f"output_dir={work_dir}/run",
             f"dist.reshard_after_forward={str(reshard).lower()}"],
        )  # fmt: skip
        torch.manual_seed(0)
        student, teacher = arch.build_student_teacher(cfg)
        with torch.no_grad():  # a student unlike the teacher, so that the EMA moves it
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        plain = {"student": student.state_dict(), "teacher": teacher.state_dict()}
        plain = {k: {n: t.clone() for n, t in sd.items()} for k, sd in plain.items()}
        device = torch.device("cpu")
        mesh = build_mesh(device, world_size)
        parallelize(student, cfg.dist, device, mesh, train=True)
        # train=True shards the teacher with the student's setting (no checkpointing here)
        parallelize(teacher, cfg.dist, device, mesh, train=mode == "unsharded_teacher")
        outputs, weights = [], []
        for step in range(inputs["rounds"] + 1):
            if mode == "unsharded_teacher":  # before the forward, which leaves it unsharded
                weights.append(full_weights(teacher))
            with torch.no_grad():
                out = teacher(inputs["global_crops"], None, None, inputs["mask_indices"])
            outputs.append([t.detach().clone() for t in out])
            if mode != "unsharded_teacher":  # the forward resharded it
                weights.append(full_weights(teacher))
            if step < inputs["rounds"]:
                arch.update_teacher(student, teacher, inputs["momentum"])
        result = {"outputs": outputs, "weights": weights}
        if rank == 0:
            result["plain"] = plain
        torch.save(result, f"{work_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
