"""Which stages a run executes, and whether their earlier outputs may be reused.

Each stage keeps ``RUN/stages/<stage>.json``: the values of its settings (the config keys that
define its output), its state (``running`` while it works, ``done`` once finished), the token of
the inputs it was computed from, and its summary. Before any work:

- a stage that ran before with other settings is refused with an error naming the key, unless
  the run lists it in ``redo``, which removes that stage's outputs and those of every later stage;
- a stage whose required stages are neither in this run nor finished is refused.

No Ray here: the CLI checks the plan before a cluster is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from pipeline.layout import RunLayout
from pipeline.shardio import write_stats
from pipeline.stages import BY_NAME, STAGE_NAMES, later_stages
from pretrain.configtools import ConfigError, to_dict


def stage_settings(cfg: Any, stage: str) -> dict[str, Any]:
    """{dotted key: value} of the settings that define ``stage``'s output."""
    values = to_dict(cfg)
    out = {}
    for dotted in BY_NAME[stage].settings:
        value = values
        for part in dotted.split("."):
            value = value[part]
        out[dotted] = value
    return out


def resolve_plan(cfg: Any) -> list[str]:
    """The stages to run, validated: known names, canonical order, no repeats."""
    names = list(cfg.stages)
    unknown = [n for n in names + list(cfg.redo) if n not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"stages/redo: unknown stage {unknown[0]!r}; stages are {STAGE_NAMES}")
    if not names:
        raise ConfigError(f"stages is empty: list some of {STAGE_NAMES}")
    order = [STAGE_NAMES.index(n) for n in names]
    if order != sorted(set(order)):
        raise ConfigError(f"stages must be distinct and in pipeline order {STAGE_NAMES}: {names}")
    return names


def read_state(layout: RunLayout, stage: str) -> dict | None:
    path = layout.stage_file(stage)
    return json.loads(path.read_text()) if path.exists() else None


def check_plan(cfg: Any, layout: RunLayout) -> list[str]:
    """Validate the plan against what the run directory holds; raise ConfigError. Read-only."""
    plan = resolve_plan(cfg)
    redone = _redone(cfg)
    for stage in plan:
        state = None if stage in redone else read_state(layout, stage)
        if state is not None:
            _check_same_settings(cfg, layout, stage, state)
        for needed in BY_NAME[stage].requires:
            if needed in plan:
                continue
            needed_state = None if needed in redone else read_state(layout, needed)
            if not needed_state or needed_state.get("state") != "done":
                raise ConfigError(
                    f"stage {stage!r} needs the outputs of {needed!r}, which {layout.root} does "
                    f"not hold finished: add it to stages (stages=[{needed},{stage}])"
                )
            _check_same_settings(cfg, layout, needed, needed_state)
    return plan


def _redone(cfg: Any) -> set[str]:
    if not cfg.redo:
        return set()
    first = min(STAGE_NAMES.index(n) for n in cfg.redo)
    return set(STAGE_NAMES[first:])


def _check_same_settings(cfg: Any, layout: RunLayout, stage: str, state: dict) -> None:
    now = stage_settings(cfg, stage)
    changed = [
        f"{key}={old!r} (now {now[key]!r})"
        for key, old in state.get("settings", {}).items()
        if key in now and now[key] != old
    ]
    if changed:
        raise ConfigError(
            f"{layout.root}: stage {stage!r} ran with {'; '.join(changed)}. Keep the old "
            f"values, add redo=[{stage}] to redo {stage!r} and every later stage "
            f"({', '.join(later_stages(stage))}), or use a new output_dir"
        )


def apply_redo(cfg: Any, layout: RunLayout) -> list[str]:
    """Remove the outputs and state of the redone stages and all later ones; return them."""
    removed = []
    for stage in STAGE_NAMES:
        if stage not in _redone(cfg):
            continue
        for path in layout.stage_dirs(stage):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        layout.stage_file(stage).unlink(missing_ok=True)
        removed.append(stage)
    return removed


def mark(layout: RunLayout, cfg: Any, stage: str, state: str, **fields: Any) -> None:
    """Record a stage's state with its settings (atomic)."""
    record = {
        "stage": stage,
        "state": state,
        "settings": stage_settings(cfg, stage),
        "updated_at": time.time(),
        **fields,
    }
    write_stats(record, layout.stage_file(stage))


def is_done(state: dict | None, input_token: str | None = None) -> bool:
    """Whether a stage state (``read_state``) is finished, from the same inputs if given."""
    if not state or state.get("state") != "done":
        return False
    return input_token is None or state.get("input_token") == input_token


def fork_run(source: Any, dest: Any, through: str, exist_ok: bool = False) -> list[str]:
    """Start run directory ``dest`` from ``source``'s finished stages up to ``through``: their
    outputs are hard-linked (copied across file systems) and their states copied, so that
    ``dest`` runs the later stages with other settings while ``source`` stays as it is (an
    ablation: another curation of the same embeddings). Finished files are never rewritten in
    place (every writer renames a new file over the old), so the links cannot leak changes.
    ``exist_ok``: a ``dest`` already forked from the same finished stages is left as it is."""
    src, dst = RunLayout(source), RunLayout(dest)
    if through not in STAGE_NAMES:
        raise ConfigError(f"fork: unknown stage {through!r}; stages are {STAGE_NAMES}")
    stages = list(STAGE_NAMES[: STAGE_NAMES.index(through) + 1])
    for stage in stages:
        state = read_state(src, stage)
        if not state or state.get("state") != "done":
            raise ConfigError(f"fork: {src.root} has no finished {stage!r} stage to start from")
    if dst.root.exists() and any(dst.root.iterdir()):
        if exist_ok and all(read_state(dst, s) == read_state(src, s) for s in stages):
            return stages
        raise ConfigError(
            f"fork: {dst.root} exists and is not empty"
            + (" (and holds other stages than the source's)" if exist_ok else "")
        )
    later = {p for stage in STAGE_NAMES[len(stages) :] for p in src.stage_dirs(stage)}
    dst.stages_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        for path in src.stage_dirs(stage):
            if path.exists() and path != src.train_shard_list:
                _link_tree(path, dst.root / path.relative_to(src.root), later)
        shutil.copy2(src.stage_file(stage), dst.stage_file(stage))
    if src.config.exists():
        shutil.copy2(src.config, dst.config)
    if "write" not in stages:  # dest trains on the crawl until its own write stage runs
        from pipeline.shardio import write_train_shard_list

        write_train_shard_list(dst, [s.tar for s in dst.crawl_done()])
    elif src.train_shard_list.exists():
        shutil.copy2(src.train_shard_list, dst.train_shard_list)
    return stages


def _link_tree(path: Any, target: Any, skip: set) -> None:
    if path in skip:
        return
    if path.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in sorted(path.iterdir()):
            if child.name.startswith(".") and child.name.endswith(".tmp"):
                continue  # a half-written file of a killed run
            _link_tree(child, target / child.name, skip)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(path, target)
