"""Result rows as JSON lines, written the moment they exist: a bench killed part-way (a timeout
on a device lease, an OOM, a crash in a later case) keeps every figure it had measured.

    rows = RowWriter.from_args(args, "train")    # --jsonl, default runs/bench/train.jsonl
    rows.write({"model": "vit_base", "images_per_sec": 243.0})

Each row is one line, appended with a single write and flushed before `write` returns; it gets
`bench` (the script), `run` (one id per invocation, so runs appended to one file stay apart)
and `utc` (when the row was written) in front of its own keys.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def default_path(bench: str) -> Path:
    return REPO / "runs" / "bench" / f"{bench}.jsonl"


def add_jsonl_arg(parser: argparse.ArgumentParser, bench: str, shown: str | None = None) -> None:
    """`--jsonl PATH`, None when not given (`RowWriter.from_args` then takes default_path);
    `shown`: the default as the help should name it, where the caller picks another."""
    shown = shown or str(default_path(bench).relative_to(REPO))
    parser.add_argument(
        "--jsonl",
        help=f"append each result row to this JSON-lines file as it is measured (default {shown})",
    )


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; a last line cut off by a kill is left out."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class RowWriter:
    def __init__(self, path: str | Path, bench: str) -> None:
        self.path, self.bench = Path(path), bench
        self.run = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_args(cls, args: argparse.Namespace, bench: str) -> RowWriter:
        return cls(args.jsonl or default_path(bench), bench)

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append `row` as one line; returns it with the bookkeeping keys added."""
        stamped = {"bench": self.bench, "run": self.run,
                   "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}  # fmt: skip
        line = json.dumps(stamped, default=str) + "\n"
        # opened per row in append mode: one write() of a whole line, so a kill never leaves a
        # half-written earlier row, and nothing waits in a buffer of ours
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
        return stamped
