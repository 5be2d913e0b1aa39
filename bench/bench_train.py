"""Training throughput with a per-phase breakdown (data, forward, backward, optimiser, EMA).

Each case runs the real job's parts (WebDataset loader on generated shards, FSDP2 student and
teacher, DINO/iBOT/KoLeo losses, AdamW, EMA) under torchrun and times every phase; rank 0
reports. The data share is the time the step waits for its batch. Each case's row is appended
to `--jsonl` (default runs/bench/train.jsonl) the moment it finishes.

    python bench/bench_train.py                          # CPU: vit_test, vit_small x 1, 2 procs
    python bench/bench_train.py --device cuda --models vit_small,vit_base,vit_large \
        --nprocs 1 --batch 64 --global-size 224 --local-size 98 --local-crops 8 --attn xformers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _rows import RowWriter, add_jsonl_arg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("data", "forward", "backward", "optimizer", "ema")


def _overrides(args: argparse.Namespace, model: str, shards: str, out: str) -> list[str]:
    return [
        f"model.arch={model}", f"data.shards={shards}", f"output_dir={out}",
        f"data.batch_size_per_rank={args.batch}", f"data.num_workers={args.workers}",
        f"crops.global_crops_size={args.global_size}", f"crops.local_crops_size={args.local_size}",
        f"crops.local_crops_number={args.local_crops}", f"model.attn_backend={args.attn}",
        f"dist.mixed_precision={args.precision}", f"train.steps={args.warmup + args.steps}",
        "logging.tensorboard=false",
    ]  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from pretrain import arch, optim
    from pretrain.config import load_train_config
    from pretrain.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
    from pretrain.data.loader import build_pretrain_loader
    from pretrain.data.photometric import batch_to_device
    from pretrain.logging_utils import device_peak_flops, train_flops_per_image
    from pretrain.parallelize import init_distributed
    from pretrain.train import build_job

    cfg = load_train_config(args.config, args.overrides)
    rank, world, device = init_distributed(cfg.dist)
    torch.manual_seed(0)
    job = build_job(cfg, device, world)
    student, teacher, losses, opt, sched = (job.student, job.teacher, job.losses, job.optimizer,
                                            job.schedules)  # fmt: skip
    loader = build_pretrain_loader(
        cfg, rank=rank, world_size=world, start_batch=0, device_type=device.type
    )[0]
    batches = iter(loader)
    params = [p for p in student.parameters() if p.requires_grad]

    def mark() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def one_step(step: int) -> tuple[float, ...]:
        t0 = mark()
        batch = batch_to_device(next(batches), device, IMAGENET_MEAN, IMAGENET_STD)
        t1 = mark()
        values = sched.at(step)
        optim.apply_step_values(opt, values)
        terms = arch.compute_losses(student, teacher, losses, batch, values.teacher_temp, cfg)
        t2 = mark()
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        t3 = mark()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        opt.step()
        t4 = mark()
        arch.update_teacher(student, teacher, values.momentum)
        t5 = mark()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4

    totals = dict.fromkeys(PHASES, 0.0)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            totals = dict.fromkeys(PHASES, 0.0)
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        for name, dt in zip(PHASES, one_step(step)):
            totals[name] += dt
    if args.profile and rank == 0:
        profile_step(one_step, args.warmup + args.steps, device, Path(args.profile))
    # on the device: NCCL reduces CUDA tensors only (gloo takes the CPU one as before)
    per_rank = torch.tensor([totals[p] for p in PHASES], dtype=torch.float64, device=device)
    dist.all_reduce(per_rank, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    per_rank = per_rank.cpu()
    if rank == 0:
        wall = float(per_rank.sum())
        c = cfg.crops
        flops = train_flops_per_image(
            student.backbone.n_blocks, student.backbone.embed_dim, cfg.model.patch_size,
            c.global_crops_size, c.local_crops_size, c.local_crops_number, 0,
        )  # fmt: skip
        ips = args.steps * cfg.data.batch_size_per_rank * world / wall
        result = {
            "model": cfg.model.arch, "nproc": world, "device": device.type,
            "batch_per_rank": cfg.data.batch_size_per_rank, "images_per_sec": ips,
            "images_per_sec_per_device": ips / world, "tflops_per_device": ips / world * flops / 1e12,
            **{f"{p}_s_per_step": float(v) / args.steps for p, v in zip(PHASES, per_rank)},
            "data_share": float(per_rank[0]) / wall,
        }  # fmt: skip
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result["gpu"] = torch.cuda.get_device_name()
            peak = device_peak_flops()
            if peak:
                result["mfu"] = result["tflops_per_device"] * 1e12 / peak
        Path(args.result).write_text(json.dumps(result))
    dist.destroy_process_group()


def profile_step(one_step, step: int, device, path: Path) -> None:
    """One more step under torch.profiler: the top operators by self time, as a text table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        one_step(step)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=25) + "\n")


def run_case(args: argparse.Namespace, model: str, nproc: int, shards: str, tmp: str) -> dict:
    result = Path(tmp) / f"{model}-{nproc}.json"
    # the caller's own overrides last: they win over the bench's (dist.compile=true, ...)
    overrides = [*_overrides(args, model, shards, str(Path(tmp) / "out")), *args.overrides]
    profile = ["--profile", f"{args.profile}-{model}-{nproc}.txt"] if args.profile else []
    # torchrun as a module: the interpreter's own, wherever its console scripts were installed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), __file__, "--worker", "--result", str(result), "--config", args.config,
           *profile, "--", *overrides]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // nproc)), PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} x{nproc} failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def table(results: list[dict]) -> str:
    head = "| model | procs | img/s | img/s/device | data | fwd | bwd | optim | EMA | data share |"
    lines = [head, "|" + "---|" * 10]
    for r in results:
        ms = [f"{1000 * r[f'{p}_s_per_step']:.0f} ms" for p in PHASES]
        lines.append(
            f"| {r['model']} | {r['nproc']} | {r['images_per_sec']:.1f} | "
            f"{r['images_per_sec_per_device']:.1f} | {' | '.join(ms)} | {100 * r['data_share']:.1f}% |"
        )
    if any("peak_memory_gib" in r for r in results):
        lines.append("")
        for r in results:
            lines.append(f"- {r['model']}: peak memory {r.get('peak_memory_gib', 0):.1f} GiB, "
                         f"{r['tflops_per_device']:.0f} TFLOP/s per device, MFU {100 * r.get('mfu', 0):.1f}%")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--config", default=str(REPO / "configs/pretrain/vit_test_cpu.yaml"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="vit_test,vit_small")
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="loader workers per rank")
    p.add_argument("--global-size", type=int, default=56)
    p.add_argument("--local-size", type=int, default=28)
    p.add_argument("--local-crops", type=int, default=2)
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "xformers"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads shared by the procs (min 1 each)"
    )
    p.add_argument("--images", type=int, default=512, help="generated shapes in the shards")
    p.add_argument(
        "--profile",
        help="profile one extra step of each case: top operators to PROFILE-MODEL-NPROC.txt",
    )
    add_jsonl_arg(p, "train")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from pretrain.data.synthetic import write_shapes_shards

    load = os.getloadavg()
    rows = RowWriter.from_args(args, "train")
    # what a row's figures were measured at, beside the worker's own keys
    setting = {"global_size": args.global_size, "local_size": args.local_size,
               "local_crops": args.local_crops, "precision": args.precision, "attn": args.attn,
               "steps": args.steps, "warmup": args.warmup, "workers": args.workers}  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        size = max(64, args.global_size + args.global_size // 4)
        write_shapes_shards(Path(tmp) / "shards", args.images, per_shard=128, size=size)
        for model in args.models.split(","):
            for nproc in (int(n) for n in args.nprocs.split(",")):
                try:
                    results.append(run_case(args, model, nproc, str(Path(tmp) / "shards"), tmp))
                except RuntimeError as e:
                    rows.write({"model": model, "nproc": nproc, **setting, "error": str(e)[-2000:]})
                    raise
                rows.write({**results[-1], **setting})
                print(json.dumps(results[-1]), flush=True)
    print(f"\nload average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
