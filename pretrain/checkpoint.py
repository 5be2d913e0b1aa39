"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, resumable at any world size.

Layout:  OUTPUT/checkpoints/step_0000050/  (DCP files + meta.json + rng_rank{r}.pt)

A save goes to `.tmp-step_...` and is renamed by rank 0 once every rank has written and
`meta.json` is in: a killed save leaves only a temp dir, swept at the next start, and never
touches the latest good checkpoint. The last `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from pretrain import dcp_safe
from pretrain.configtools import (
    AtomicFile,
    ConfigError,
    atomic_write_text,
    fsync_dir,
    load_yaml,
)

log = logging.getLogger(__name__)
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not belong to this model or run."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed, holding meta.json), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob(f"{_PREFIX}*") if (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def sweep_partial_saves(ckpt_dir: str | Path) -> None:
    """Remove temp dirs of saves that were killed (rank 0, before anything else runs)."""
    if _rank() == 0 and Path(ckpt_dir).is_dir():
        for tmp in Path(ckpt_dir).glob(f"{_TMP_PREFIX}*"):
            log.warning("removing the partial checkpoint %s of a killed save", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier()


def rng_state() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2]]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            int(state["numpy_pos"][0]),
            0,
            0.0,
        )
    )
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_dict(
    student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, losses: nn.Module
) -> dict[str, Any]:
    return {
        "student": get_model_state_dict(student),
        "teacher": get_model_state_dict(teacher),
        "optimizer": get_optimizer_state_dict(student, optimizer),
        "losses": losses.state_dict(),  # centers: replicated across ranks (all-reduced)
    }


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    *,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    losses: nn.Module,
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{_PREFIX}{step:07d}"
    tmp = ckpt_dir / f"{_TMP_PREFIX}{final.name}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_state_dict(student, teacher, optimizer, losses), checkpoint_id=str(tmp))
    with AtomicFile(tmp / f"rng_rank{_rank()}.pt") as rng_file:  # DCP fsyncs its own files
        torch.save(rng_state(), rng_file)
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        atomic_write_text(
            tmp / "meta.json", json.dumps({**meta, "step": step, "world_size": world})
        )
        if final.exists():  # a rerun of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)  # the new checkpoint's name is on disk before older ones go
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def read_meta(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a readable checkpoint meta.json: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError(f"{file}: a checkpoint meta.json holds an object with an integer step")
    return meta


def check_model_matches(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """`model_signature` entries (arch, dims) must agree, else a clear error before loading."""
    diffs = {
        k: (saved.get("model", {}).get(k), v)
        for k, v in current.items()
        if saved.get("model", {}).get(k) != v
    }
    if diffs:
        detail = ", ".join(
            f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diffs.items()
        )
        raise CheckpointMismatchError(f"checkpoint {path} was made for another model ({detail})")


def load_checkpoint(
    path: str | Path,
    *,
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    losses: nn.Module,
    model_signature: dict[str, Any],
) -> dict[str, Any]:
    """Load in place (DCP reshards to this world size); returns the checkpoint's meta."""
    path = Path(path)
    meta = read_meta(path)
    check_model_matches(meta, model_signature, path)
    state = _state_dict(student, teacher, optimizer, losses)
    dcp_safe.load(state, path)  # no code from the checkpoint's pickles
    set_model_state_dict(student, state["student"])
    set_model_state_dict(teacher, state["teacher"])
    set_optimizer_state_dict(student, optimizer, state["optimizer"])
    losses.load_state_dict(state["losses"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = path / f"rng_rank{_rank()}.pt"
    if meta["world_size"] == world and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log.warning(
            "checkpoint written by %d ranks, resuming on %d: RNG and data order restart per rank",
            meta["world_size"],
            world,
        )
    return meta


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def check_run_config(
    saved_yaml: str,
    current: dict[str, Any],
    allowed: list[str],
    where: Path,
    defaults: dict[str, Any] | None = None,
) -> None:
    """A run dir's saved config must match this run's, apart from keys in `allowed`.

    A key the saved config lacks (added to the schema after that run started) matches when this
    run keeps its default from `defaults`: the earlier run used that value implicitly.
    """
    saved = _flatten(load_yaml(saved_yaml, where / "config.yaml") or {})
    now = _flatten(current)
    default = _flatten(defaults or {})
    skip = set(allowed) | {"output_dir"}
    for key in set(now) - set(saved):
        if key in default and default[key] == now[key]:
            skip.add(key)
    diffs = sorted(
        k
        for k in set(saved) | set(now)
        if k not in skip and saved.get(k, "<unset>") != now.get(k, "<unset>")
    )
    if diffs:
        detail = "; ".join(
            f"{k}: saved {saved.get(k, '<unset>')!r}, now {now.get(k, '<unset>')!r}"
            for k in diffs[:8]
        )
        raise ConfigError(
            f"{where} holds another run's config ({detail}). Use a new output_dir, or the same "
            "settings to resume."
        )
