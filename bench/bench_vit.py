"""ViT forward + backward on a DINOv2 multi-crop batch: dinoforge vs timm, side by side.

    python bench/bench_vit.py                                   # CPU: vit_small, batch 16, fp32
    python bench/bench_vit.py --device cuda --dtype bf16 --batch 64 --model vit_small vit_base

Each step runs one batch of `--batch` images, each giving 2 global crops (224 px) and 8 local
crops (98 px), through forward and backward. Variants: dinoforge with SDPA (one call per
resolution), dinoforge with xformers (every crop packed into one block-diagonal call; CUDA
only), and timm's VisionTransformer of the same dimensions (fused SDPA attention,
dynamic_img_size) run once per resolution. Every measurement runs in its own subprocess so that
peak memory (CPU: RSS high-water mark; CUDA: max allocated) is comparable; rounds alternate
between variants (A B, then B A) so machine load hits them alike, and the median round is reported.
Every measurement and each model's summary is appended to `--jsonl` (default
runs/bench/vit.jsonl) as soon as it exists; `--out` gets the whole report at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from _rows import RowWriter, add_jsonl_arg

ARCH_DIMS = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


def build(variant: str, model_name: str) -> torch.nn.Module:
    if variant.startswith("dinoforge"):
        from pretrain.models import build_backbone

        backend = "xformers" if variant == "dinoforge-xformers" else "sdpa"
        # the timm peer below has an MLP feed-forward: compare like with like
        return build_backbone(model_name, attn_backend=backend, ffn_layer="mlp")
    from timm.models.vision_transformer import VisionTransformer

    dim, depth, heads = ARCH_DIMS[model_name]
    return VisionTransformer(
        img_size=224,
        patch_size=14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        num_classes=0,
        dynamic_img_size=True,
        init_values=1e-5,
    )


def step_loss(variant: str, model: torch.nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
    """The same work for both: final normed tokens of every crop, CLS and patches in the loss."""
    if variant.startswith("dinoforge"):
        outs = model.forward_features(crops)
        return sum(
            o["x_norm_clstoken"].float().square().mean() + o["x_norm_patchtokens"].float().mean()
            for o in outs
        )
    total = 0.0
    for batch in crops:
        tokens = model.forward_features(batch)  # [B, 1+N, D], normed
        total = total + tokens[:, 0].float().square().mean() + tokens[:, 1:].float().mean()
    return total


def measure(args: argparse.Namespace) -> dict:
    """One variant, in this process: images/s over --iters steps after --warmup steps."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.variant, args.worker_model).to(device)
    crops = [
        torch.randn(2 * args.batch, 3, args.global_size, args.global_size, device=device),
        torch.randn(args.n_local * args.batch, 3, args.local_size, args.local_size, device=device),
    ]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            sync()
            start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = step_loss(args.variant, model, crops)
        loss.backward()
    sync()
    elapsed = time.perf_counter() - start
    result = {"images_per_s": args.batch * args.iters / elapsed, "step_s": elapsed / args.iters}
    if device.type == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result |= {"peak_mem_mib": peak_kb / 1024, "step_mem_mib": (peak_kb - rss_before_kb) / 1024}
    return result


def run_variant(args: argparse.Namespace, variant: str, model_name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--worker-model", model_name]
    for key in (
        "device",
        "dtype",
        "batch",
        "n_local",
        "global_size",
        "local_size",
        "iters",
        "warmup",
        "threads",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rounds: list[dict]) -> dict:
    failed = [r["error"] for r in rounds if "error" in r]
    if failed:
        return {"error": failed[0]}
    summary = {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}
    summary["rounds_images_per_s"] = [round(r["images_per_s"], 3) for r in rounds]
    # on a shared machine the least-disturbed round is the better estimate of the variant itself
    summary["best_images_per_s"] = max(summary["rounds_images_per_s"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", default=["vit_small"], choices=sorted(ARCH_DIMS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument(
        "--batch", type=int, default=16, help="images per step (each gives 2 + n_local crops)"
    )
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="also write the JSON report to this file")
    add_jsonl_arg(parser, "vit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.worker:
        args.variant = args.worker
        print(json.dumps(measure(args)))
        return
    variants = ["dinoforge-sdpa", "timm"] + (
        ["dinoforge-xformers"] if args.device == "cuda" else []
    )
    config = {k: v for k, v in vars(args).items()
              if not k.startswith("worker") and k not in ("out", "jsonl")}  # fmt: skip
    report = {"config": config, "load_before": os.getloadavg(), "results": {}}
    rows = RowWriter.from_args(args, "vit")
    shared = {k: config[k] for k in ("device", "dtype", "batch", "n_local", "global_size",
                                     "local_size", "iters", "warmup", "threads")}  # fmt: skip
    for model_name in args.model:
        rounds = {v: [] for v in variants}
        for index in range(args.rounds):
            # interleaved and order-alternating (A B, B A, ...) so a load trend favours no one
            for variant in variants if index % 2 == 0 else variants[::-1]:
                rounds[variant].append(run_variant(args, variant, model_name))
                rows.write({"kind": "round", "model": model_name, "variant": variant,
                            "round": index, **shared, **rounds[variant][-1]})  # fmt: skip
                print(f"{model_name} {variant}: {rounds[variant][-1]}", file=sys.stderr, flush=True)
        results = {v: summarise(r) for v, r in rounds.items()}
        if "error" not in results["timm"] and "error" not in results["dinoforge-sdpa"]:
            ours, peer = results["dinoforge-sdpa"], results["timm"]
            results["ratio_sdpa_vs_timm"] = {
                "speed": round(ours["images_per_s"] / peer["images_per_s"], 3),
                "peak_mem": round(ours["peak_mem_mib"] / peer["peak_mem_mib"], 3),
            }
        report["results"][model_name] = results
        rows.write({"kind": "summary", "model": model_name, **shared, "results": results})
    report["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
