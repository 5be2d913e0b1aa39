"""The GPU checklist (../shared/GPU.md) as one prepared run that fits a short device lease.

On the device machine (`run` tool; wheels from `make gpu-wheels`, carried as `.wheels`):

    pip install -q --no-deps .wheels/*.whl && python bench/gpu_checklist.py --out "$OUT"

(No `pip install -e .`: with no network its isolated build cannot fetch setuptools; every step
runs with the repository on PYTHONPATH instead.)

Here, before spending device time, the same steps on the CPU at toy sizes (arguments, imports
and report parsing; the figures mean nothing), `make gpu-smoke`:

    python bench/gpu_checklist.py --smoke --out runs/gpu-smoke

Steps, each a subprocess with its own timeout, so that one failure (xformers missing, a step
running long) leaves the others' figures:

0. `env`: torch / CUDA / xformers versions, `nvidia-smi`.
1. `attention`: `pytest -m gpu` (xformers' packed attention equals SDPA per resolution).
2. `vit`: `bench/bench_vit.py` bf16, batch 64, vit_small and vit_base: xformers packed, SDPA
   per resolution and timm, images/s and peak memory.
3. `train-vitb`, `train-vitl`: `bench/bench_train.py` with the DINOv2 recipes
   (`vitb14.yaml`, `vitl14.yaml`), batch 64 bf16, 2 x 224 + 8 x 98 crops, one rank: images/s,
   peak memory, MFU; one extra step profiled (top operators by self CUDA time).
4. `embed`: `bench/bench_embed.py` ViT-L/14 bf16 at 224 px: the bare forward against the embed
   stage's path (decode + preprocess + forward + write), without Ray.
5. `loader`: `bench/bench_loader.py`: loader images/s per core (before / uint8 / photometric
   on the device) and the device part's time on the GPU.
6. `train-vitl-levers`, `train-vitl-batch96`: ViT-L/14 again with `dist.compile=true` and
   `optim.implementation=fused`, at batch 64 and 96.

Every step's log goes to OUT/NN-step.log, its JSON report (where it prints one) into
OUT/summary.json, which is printed at the end. Steps whose timeout no longer fits in
`--budget-s` are skipped and say so. The benches among the steps append their rows to
OUT/<step>.jsonl as they measure them, so a step cut off by its timeout still brings back what
it had; those rows go into its summary entry (`rows`), and each step's entry is appended to
`--jsonl` (default OUT/summary.jsonl) the moment the step ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# the row helper sits beside this file; the tests import this module by path, not as a script
sys.path.insert(0, str(REPO / "bench"))

from _rows import RowWriter, add_jsonl_arg, read_rows  # noqa: E402

BENCH_STEPS = (
    "vit",
    "train-vitb",
    "train-vitl",
    "embed",
    "loader",
    "train-vitl-levers",
    "train-vitl-batch96",
)  # the steps that write OUT/<step>.jsonl


def steps(out: Path, smoke: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, timeout s); `smoke` runs the same scripts on the CPU at toy sizes."""
    bench = REPO / "bench"
    env_probe = (
        "import json, torch\n"
        "info = {'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
        "        'device': torch.cuda.get_device_name() if torch.cuda.is_available() else None}\n"
        "try:\n    import xformers; info['xformers'] = xformers.__version__\n"
        "except Exception as e:\n    info['xformers'] = f'unavailable: {e!r}'\n"
        "print(json.dumps(info))\n"
    )
    env = [PY, "-c", env_probe]
    attention = [PY, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                 str(REPO / "tests/pretrain/test_attention_gpu.py")]  # fmt: skip
    if smoke:
        dev = ["--device", "cpu"]
        vit = [PY, str(bench / "bench_vit.py"), *dev, "--batch", "2", "--model", "vit_small",
               "--global-size", "56", "--local-size", "28", "--n-local", "2", "--iters", "1",
               "--rounds", "1", "--out", str(out / "vit.json")]  # fmt: skip
        train = [PY, str(bench / "bench_train.py"), *dev, "--nprocs", "1", "--batch", "4",
                 "--global-size", "56", "--local-size", "28", "--local-crops", "2",
                 "--steps", "2", "--warmup", "1", "--images", "64"]  # fmt: skip
        train_b = [*train, "--models", "vit_test", "--profile", str(out / "profile")]
        train_l = [*train, "--models", "vit_small"]
        embed = [PY, str(bench / "bench_embed.py"), *dev, "--model", "vit_small", "--images",
                 "64", "--batch", "16", "--size", "56", "--rounds", "1"]  # fmt: skip
        loader = [PY, str(bench / "bench_loader.py"), *dev, "--rounds", "1", "--batches", "1",
                  "--batch", "4", "--images", "64"]  # fmt: skip
        levers = [*train, "--models", "vit_test", "dist.compile=true",
                  "optim.implementation=fused"]  # fmt: skip
    else:
        dev = ["--device", "cuda"]
        vit = [PY, str(bench / "bench_vit.py"), *dev, "--dtype", "bf16", "--batch", "64",
               "--model", "vit_small", "vit_base", "--iters", "10", "--warmup", "3",
               "--rounds", "2", "--out", str(out / "vit.json")]  # fmt: skip
        train = [PY, str(bench / "bench_train.py"), *dev, "--nprocs", "1", "--batch", "64",
                 "--global-size", "224", "--local-size", "98", "--local-crops", "8",
                 "--precision", "bf16", "--workers", "12", "--steps", "15", "--warmup", "5",
                 "--images", "1024", "--profile", str(out / "profile")]  # fmt: skip
        train_b = [*train, "--models", "vit_base", "--config", str(REPO / "configs/pretrain/vitb14.yaml")]  # fmt: skip
        train_l = [*train, "--models", "vit_large", "--config", str(REPO / "configs/pretrain/vitl14.yaml")]  # fmt: skip
        embed = [PY, str(bench / "bench_embed.py"), *dev, "--model", "vit_large", "--images",
                 "4096", "--shard-size", "1024", "--batch", "256", "--decode-threads", "12",
                 "--rounds", "2"]  # fmt: skip
        loader = [PY, str(bench / "bench_loader.py"), *dev, "--rounds", "2", "--batches", "4",
                  "--batch", "32"]  # fmt: skip
        # the levers for ViT-L's MFU: compile per block and fused AdamW, then a larger batch
        levers = [*train_l, "dist.compile=true", "optim.implementation=fused"]
        levers_b = [*levers[:levers.index("--batch") + 1], "96",
                    *levers[levers.index("--batch") + 2:]]  # fmt: skip
    listed = [
        ("env", env, 60),
        ("attention", attention, 150),
        ("vit", vit, 150),
        ("train-vitb", train_b, 120),
        ("train-vitl", train_l, 150),
        ("embed", embed, 120),
        ("loader", loader, 120),
        ("train-vitl-levers", levers, 240),
    ]
    if not smoke:
        listed.append(("train-vitl-batch96", levers_b, 240))
    return [(name, [*cmd, "--jsonl", str(step_rows(out, name))] if name in BENCH_STEPS else cmd,
             timeout) for name, cmd, timeout in listed]  # fmt: skip


def step_rows(out: Path, name: str) -> Path:
    return out / f"{name}.jsonl"


def last_json(text: str):
    """The last JSON value a script printed: a one-line object, or an indented block."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if line.startswith("{"):
            for candidate in (line, "\n".join(lines[i:])):
                try:
                    return json.loads(candidate)
                except ValueError:
                    pass
    return None


def run_step(name: str, cmd: list[str], timeout: int, log: Path) -> dict:
    started = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # its own process group: a step past its timeout is killed with every process it started
    # (torchrun's workers, DataLoader workers), so none keeps the GPU busy for the next step
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc = "timeout"
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    result = {"rc": rc, "wall_s": round(time.monotonic() - started, 1), "report": last_json(stdout)}
    if rc != 0:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        result["error_tail"] = tail
    if name == "attention":  # pytest prints its verdict, not JSON
        result["report"] = (stdout.strip().splitlines() or [""])[-1]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for logs, profiles and summary.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: check the steps run")
    parser.add_argument("--only", help="comma-separated step names")
    parser.add_argument("--budget-s", type=int, default=540, help="skip steps that no longer fit")
    add_jsonl_arg(parser, "gpu_checklist", shown="OUT/summary.jsonl")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = RowWriter(args.jsonl or out / "summary.jsonl", "gpu_checklist")
    wanted = set(args.only.split(",")) if args.only else None
    summary: dict = {"smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "load_before": os.getloadavg(), "steps": {}}  # fmt: skip
    t0 = time.monotonic()
    for index, (name, cmd, timeout) in enumerate(steps(out, args.smoke)):
        if wanted is not None and name not in wanted:
            continue
        left = args.budget_s - (time.monotonic() - t0)
        if timeout > left:
            summary["steps"][name] = {
                "skipped": f"needs up to {timeout} s, {left:.0f} s of the budget left"
            }
            rows.write({"step": name, "smoke": args.smoke, **summary["steps"][name]})
            continue
        # this call's rows only: an OUT reused from an earlier call holds that call's rows
        step_rows(out, name).unlink(missing_ok=True)
        result = run_step(name, cmd, timeout, out / f"{index:02d}-{name}.log")
        if step_rows(out, name).is_file():
            result["rows"] = read_rows(step_rows(out, name))
        summary["steps"][name] = result
        rows.write({"step": name, "smoke": args.smoke, **result})
        print(
            f"[{time.monotonic() - t0:6.1f} s] {name}: rc {result['rc']}, {result['wall_s']} s",
            flush=True,
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    text = json.dumps(summary, indent=2, default=str)
    (out / "summary.json").write_text(text + "\n")
    print(text)
    return 0 if all(s.get("rc") == 0 for s in summary["steps"].values() if "rc" in s) else 1


if __name__ == "__main__":
    sys.exit(main())
