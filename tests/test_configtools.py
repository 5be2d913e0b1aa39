from dataclasses import dataclass, field

import pytest

from pretrain.configtools import ConfigError, load_config, load_yaml, save_config


@dataclass
class Inner:
    size: int = 256
    mode: str = "keep_ratio"


@dataclass
class Outer:
    output_dir: str = "out"
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  size: 128\n")
    cfg = load_config(Outer, f, ["inner.mode=center_crop", "output_dir=RUN"])
    assert (cfg.inner.size, cfg.inner.mode, cfg.output_dir) == (128, "center_crop", "RUN")
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Outer, tmp_path / "run" / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "yaml_text, overrides, needle",
    [
        ("inner:\n  sise: 1\n", [], "inner.sise"),
        ("", ["inner.mdoe=x"], "inner.mdoe"),
        ("", ["inner.size=big"], "inner.size"),
        ("", ["nonsense"], "key=value"),
        ("- a\n- b\n", [], "mapping"),
    ],
)
def test_bad_keys_and_values_are_named(tmp_path, yaml_text, overrides, needle):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(Outer, f, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("output_dir: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_config(Outer, f)


def test_atomic_file_gets_the_umask_mode_not_mkstemp_0600(tmp_path):
    """Shards on shared storage must be readable by the cluster's other accounts."""
    import os

    from pretrain.configtools import _UMASK, AtomicFile, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    with AtomicFile(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"y")
    for name in ("a.txt", "b.bin"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~_UMASK
    assert not list(tmp_path.glob(".*.tmp"))


def test_yaml_alias_bombs_and_self_references_are_refused(tmp_path):
    """safe_load keeps aliases shared, but copying the config expands them: nine levels of ten
    aliases are a billion values. Refused by name before anything expands them; a config with a
    few honest anchors still loads."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        refs = ",".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml: over 1,000,000 values"):
        load_config(Outer, bomb)
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: &x [1, *x]\n")
    with pytest.raises(ConfigError, match="loop.yaml: a YAML alias refers to itself"):
        load_config(Outer, loop)
    honest = tmp_path / "honest.yaml"
    honest.write_text("base: &b {lr: 0.1}\nother: *b\n")
    assert load_yaml(honest.read_text(), honest) == {"base": {"lr": 0.1}, "other": {"lr": 0.1}}
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: nested too deeply"):
        load_config(Outer, deep)
