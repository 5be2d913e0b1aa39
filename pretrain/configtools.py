"""Typed configuration: dataclass schemas, YAML values, `key=value` overrides, strict merge.

Shared by both halves of dinoforge (``pipeline`` imports it as it imports ``pretrain.models``).

    cfg = load_config(TrainConfig, "configs/pretrain/vit_test_cpu.yaml", ["train.steps=10"])
    save_config(cfg, run_dir / "config.yaml")

A key that the schema does not have, in the file or on the command line, raises ConfigError
naming the key; so does a value of the wrong type. YAML is read with a safe loader.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.safe_yaml import ConfigError, load_yaml  # callers import both from here too

T = TypeVar("T")


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = load_yaml(path.read_text(), path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping at the top, got {type(data).__name__}"
        )
    return data


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {', '.join(bad)}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {exc}") from exc


def _explain(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    if key:
        return ConfigError(f"{origin}: bad config key '{key}': {msg}")
    return ConfigError(f"{origin}: {msg}")


def load_config(
    schema: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Merge schema defaults <- YAML file <- overrides, strictly; return a typed DictConfig.

    The result behaves like an instance of ``schema`` (attribute access, typed values); call
    ``to_object`` for a plain dataclass instance.
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    if path is not None:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(_read_yaml(path)))
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from exc
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, _parse_overrides(overrides))
        except OmegaConfBaseException as exc:
            raise _explain(exc, "command line") from exc
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path) if path else "config") from exc
    return cfg  # type: ignore[return-value]


def to_object(cfg: Any) -> Any:
    """A DictConfig made by load_config, as a plain dataclass instance."""
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


_UMASK = os.umask(0)  # read once, at import (single-threaded): os.umask can only set it
os.umask(_UMASK)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the names in ``path`` (a rename into it) durable."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AtomicFile:
    """A file written under a writer-unique temporary name beside ``path`` (``.NAME.*.tmp``, so
    a stray writer of a killed run never shares it with the rerun's); ``commit`` fsyncs it,
    renames it into place and fsyncs the directory, so after a crash or power loss the file is
    either absent or whole, and a done marker committed last never outlives the files it vouches
    for. ``abort`` removes the temporary. Every writer of the project goes through this.

        with AtomicFile(path) as tmp:      # committed on success, removed on an exception
            pq.write_table(table, tmp)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        os.close(fd)
        # mkstemp creates 0600; the file gets what a plain open() would give (shared storage:
        # other users and a cluster's other accounts read the shards)
        os.chmod(tmp, 0o666 & ~_UMASK)
        self.tmp = Path(tmp)

    def commit(self) -> None:
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old content or the new, never a part."""
    with AtomicFile(path) as tmp:
        tmp.write_text(text)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Save the resolved config as YAML, atomically."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    atomic_write_text(path, to_yaml(cfg))
