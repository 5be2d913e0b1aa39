"""YAML from elsewhere, loaded safely: the one loader of configs, run configs and the
`config.yaml` beside a backbone's weights. Torch- and OmegaConf-free, so the backbone loader
(which the curation pipeline imports) can use it."""

from __future__ import annotations

import os
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


MAX_YAML_NODES = 1_000_000  # far above any real config; an alias "bomb" expands past it


def load_yaml(text: str, origin: str | os.PathLike) -> Any:
    """``yaml.safe_load`` of a file from elsewhere, refusing what would blow up once expanded.

    safe_load builds no objects but plain data, yet an alias shares one node many times, and
    nine nested levels of ten aliases are a billion nodes once OmegaConf (or anyone) copies
    them; a self-referencing alias never ends. Both are refused here, naming ``origin``."""
    try:
        data = yaml.safe_load(text)
        _count_nodes(data, {}, set(), origin)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {origin} is not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"config file {origin}: nested too deeply") from None
    return data


def _count_nodes(obj: Any, sizes: dict[int, int], open_: set[int], origin: Any) -> int:
    if not isinstance(obj, (dict, list)):
        return 1
    ident = id(obj)
    if ident in sizes:
        return sizes[ident]
    if ident in open_:
        raise ConfigError(f"config file {origin}: a YAML alias refers to itself")
    open_.add(ident)
    total = 1
    for item in obj.values() if isinstance(obj, dict) else obj:
        total += _count_nodes(item, sizes, open_, origin)
        if total > MAX_YAML_NODES:
            raise ConfigError(
                f"config file {origin}: over {MAX_YAML_NODES:,} values once its YAML aliases "
                "are expanded (an alias bomb?)"
            )
    open_.discard(ident)
    sizes[ident] = total
    return total
