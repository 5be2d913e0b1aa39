"""Run logging on rank 0: metrics.jsonl, TensorBoard events, a console line with speed and ETA.

`metrics.jsonl` holds one JSON object per logged step (`step`, `loss`, `dino_loss`,
`ibot_loss`, `koleo_loss`, `lr`, `wd`, `momentum`, `teacher_temp`, `images_per_sec`, ...). On
resume, lines past the checkpoint's step are dropped first so no step appears twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pretrain.configtools import atomic_write_text

log = logging.getLogger("pretrain.train")

# bf16 dense (no sparsity) tensor-core peak per device, for MFU, as (chip, form factor, TFLOP/s):
# a device name matches when it holds the chip as a word and, where one is given, the form
# factor too (case-insensitive). One chip comes in parts of different clocks and power, so the
# name has to tell them apart; the first match wins: each chip's specific parts come before its
# general entry, and a name that says too little (an H100 of no stated form factor) gets no peak
# rather than a wrong one. Figures: NVIDIA's datasheets. The Hopper ones print BF16 with
# sparsity only, dense being half of it (rounded down): H100 SXM 1,979 / PCIe 1,513 / NVL 1,671
# per GPU (H100 Tensor Core GPU datasheet), H200 SXM 1,979 / NVL 1,671 (H200 datasheet), GH200
# 1,979 (GH200 Grace Hopper Superchip datasheet); the A100 (SXM and PCIe, 80GB and 40GB)
# and L40S datasheets print the dense figure itself: 312 and 362.05.
# Names as torch.cuda.get_device_name() reports them: "NVIDIA H100 80GB HBM3" (the SXM5 part),
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA L40S". Parts not listed here: set
# DINOFORGE_PEAK_TFLOPS.
PEAK_TFLOPS: tuple[tuple[str, str | None, float], ...] = (
    ("GH200", None, 989.0),
    ("H200", "NVL", 835.0),
    ("H200", None, 989.0),  # the SXM part reports as plain "NVIDIA H200"
    ("H100", "NVL", 835.0),
    ("H100", "PCIe", 756.0),
    ("H100", "HBM3", 989.0),  # SXM5: "NVIDIA H100 80GB HBM3"; PCIe and NVL name themselves
    ("H100", "SXM5", 989.0),
    ("A100", None, 312.0),  # SXM4 and PCIe alike
    ("L40S", None, 362.0),
)
PEAK_ENV = "DINOFORGE_PEAK_TFLOPS"  # bf16 dense TFLOP/s of this machine's device; beats the table


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def vit_forward_flops(n_blocks: int, dim: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs of one image through a ViT: qkv + proj + MLP (2*N*D*D*(4+2*r)) + attention."""
    return n_blocks * (2 * tokens * dim * dim * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * dim)


def train_flops_per_image(
    n_blocks: int, dim: int, patch: int, global_size: int, local_size: int, n_local: int, regs: int
) -> float:
    """Student forward+backward (3x forward) over all crops + teacher forward over the globals."""
    g_tokens = (global_size // patch) ** 2 + 1 + regs
    l_tokens = (local_size // patch) ** 2 + 1 + regs
    g = vit_forward_flops(n_blocks, dim, g_tokens)
    loc = vit_forward_flops(n_blocks, dim, l_tokens)
    return 3 * (2 * g + n_local * loc) + 2 * g


def peak_tflops(device_name: str) -> float | None:
    """bf16 dense peak TFLOP/s of the device `torch.cuda.get_device_name()` calls `device_name`,
    from PEAK_TFLOPS; None for a part it does not know (no MFU is then reported)."""
    # words, so that "H200" is not found inside "GH200" nor "A100" inside "A1000"
    words = re.split(r"[^A-Z0-9]+", device_name.upper())
    for chip, form, tflops in PEAK_TFLOPS:
        if chip in words and (form is None or form.upper() in words):
            return tflops
    return None


def device_peak_flops(env: Mapping[str, str] | None = None) -> float | None:
    """This machine's device peak in FLOP/s: DINOFORGE_PEAK_TFLOPS where set, else the table's
    figure for the current CUDA device; None without CUDA or for an unknown part."""
    env = os.environ if env is None else env
    override = env.get(PEAK_ENV, "").strip()
    if override:
        try:
            tflops = float(override)
        except ValueError:
            tflops = 0.0
        if not (math.isfinite(tflops) and tflops > 0):  # a typo ignored: no MFU, or a wrong one
            raise ValueError(f"{PEAK_ENV} must be a positive number of TFLOP/s, got {override!r}")
        return tflops * 1e12
    if not torch.cuda.is_available():
        return None
    tflops = peak_tflops(torch.cuda.get_device_name())
    return None if tflops is None else tflops * 1e12


def truncate_metrics(path: Path, after_step: int) -> None:
    """Keep only lines with step <= after_step (a resumed run rewrites what came later)."""
    if not path.is_file():
        return
    kept = [
        ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= after_step
    ]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


class MetricsLogger:
    def __init__(
        self,
        output_dir: Path,
        *,
        rank: int,
        total_steps: int,
        start_step: int,
        tensorboard: bool,
        flops_per_image: float,
        world_size: int,
    ) -> None:
        self.rank, self.total = rank, total_steps
        self.flops_per_image = flops_per_image
        self.world_size = world_size
        self.peak = device_peak_flops()
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        if rank == 0:
            truncate_metrics(self.path, start_step)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self._mark_time, self._mark_step = time.perf_counter(), start_step

    def log(self, step: int, values: dict[str, float], images_in_window: int) -> dict[str, Any]:
        """Record `step`'s values; speed is averaged since the previous call."""
        now = time.perf_counter()
        elapsed = max(now - self._mark_time, 1e-9)
        steps = max(step - self._mark_step, 1)
        record: dict[str, Any] = {"step": step, **values}
        record["images_per_sec"] = images_in_window / elapsed
        record["steps_per_sec"] = steps / elapsed
        if torch.cuda.is_available():
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if self.peak:
                per_device = record["images_per_sec"] / self.world_size
                record["mfu"] = per_device * self.flops_per_image / self.peak
        self._mark_time, self._mark_step = now, step
        if self.rank == 0:
            self._write(record)
        return record

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()
        eta = (self.total - record["step"]) / max(record["steps_per_sec"], 1e-9)
        extra = ""
        if "peak_memory_gib" in record:
            extra = f" mem {record['peak_memory_gib']:.1f} GiB"
        if "mfu" in record:
            extra += f" MFU {100 * record['mfu']:.1f}%"
        log.info(
            "step %d/%d loss %.4f (dino %.4f ibot %.4f koleo %.4f) lr %.2e | %.2f steps/s "
            "%.1f img/s ETA %s%s",
            record["step"],
            self.total,
            record["loss"],
            record["dino_loss"],
            record["ibot_loss"],
            record["koleo_loss"],
            record["lr"],
            record["steps_per_sec"],
            record["images_per_sec"],
            time.strftime("%H:%M:%S", time.gmtime(eta)),
            extra,
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
