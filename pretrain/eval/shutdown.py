"""Ending the eval CLI once its result is written.

On an H200 machine the CLI printed and wrote its result and then did not exit within 60 s,
twice; on the CPU machines it exits at once, and the eval code starts no thread or process of
its own, so what held it there is not known. All that runs after `main` returns is the
interpreter's teardown: it joins every non-daemon thread and every `multiprocessing` child (one
that a library left running blocks it for good), then runs the native libraries' destructors
(OpenMP's pool, a thread per core; CUDA's, once initialised). `release` frees what the process
can free and logs what would still hold it; `leave` then ends the process without the teardown,
as nothing is left to write.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _child_pids() -> list[int]:
    """Live child processes of this process, whoever started them (Linux /proc; else [])."""
    me, pids = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)"
        except (OSError, IndexError):  # a process that ended meanwhile
            continue
        if fields[0] != "Z" and int(fields[1]) == me:  # state, parent pid; zombies hold nothing
            pids.append(int(stat.parent.name))
    return sorted(pids)


def leftovers() -> list[str]:
    """What would keep the interpreter from exiting: non-daemon threads besides this one, and
    child processes."""
    current = threading.current_thread()
    threads = [t for t in threading.enumerate() if t is not current and t.is_alive()]
    found = [f"thread {t.name!r}" for t in threads if not t.daemon]
    found += [f"child process {pid}" for pid in _child_pids()]
    return found


def release(join_timeout_s: float = 2.0) -> list[str]:
    """Free what a process that evaluated may hold: a process group, CUDA work, multiprocessing
    children (asked to stop, then terminated). Returns `leftovers()` afterwards, logged."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # nothing of ours still running on the device
        torch.cuda.empty_cache()
    for child in multiprocessing.active_children():
        child.join(timeout=join_timeout_s)
        if child.is_alive():
            child.terminate()
            child.join(timeout=join_timeout_s)
    left = leftovers()
    if left:
        log.warning("still running once the result is written: %s", ", ".join(left))
    return left


def leave(status: int = 0) -> None:
    """End the process now: streams flushed, no interpreter teardown (call `release` first)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say there
            pass
    os._exit(status)
