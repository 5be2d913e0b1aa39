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
