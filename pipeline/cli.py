"""Command line of the pipeline.

    python -m pipeline run configs/pipeline/crawl.yaml input.urls=urls.parquet output_dir=RUN
    python -m pipeline run ... --address ray://HEAD:10001     # or RAY_ADDRESS; local Ray otherwise
    python -m pipeline manifest {summary,shards,failures,validate} RUN [--json]

Every input problem (config, URL file, column, empty list) is reported before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.config import PipelineConfig, check_crawl_config
from pipeline.sources import InputError, check_input
from pretrain.configtools import ConfigError, load_config, save_config, to_dict

log = logging.getLogger("pipeline")

RESUME_KEYS = ("input", "crawl.shard_size", "crawl.image_size", "crawl.resize_mode")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="crawl a URL list / folder / tars into shards")
    run.add_argument("config", help="YAML recipe, e.g. configs/pipeline/crawl.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides")
    run.add_argument("--address", default=None, help="Ray cluster address (else RAY_ADDRESS)")
    manifest = sub.add_parser("manifest", help="inspect a run directory")
    manifest.add_argument("action", choices=["summary", "shards", "failures", "validate"])
    manifest.add_argument("run_dir")
    manifest.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def prepare_run(config: str, overrides: list[str]) -> tuple[PipelineConfig, int]:
    """Load and check everything a run needs; raise ConfigError/InputError before any work."""
    cfg = load_config(PipelineConfig, config, overrides)
    try:
        check_crawl_config(cfg.crawl)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    total = check_input(cfg.input)
    _check_same_run(cfg)
    return cfg, total


def _check_same_run(cfg: PipelineConfig) -> None:
    """Resuming with a different input or shard layout would mix two runs: refuse."""
    saved_path = Path(cfg.output_dir) / "config.yaml"
    if not saved_path.exists():
        return
    saved = to_dict(load_config(PipelineConfig, saved_path))
    current = to_dict(cfg)
    for dotted in RESUME_KEYS:
        old, new = saved, current
        for part in dotted.split("."):
            old, new = old[part], new[part]
        if old != new:
            raise ConfigError(
                f"{cfg.output_dir} holds a run with a different {dotted} ({old!r} != {new!r}): "
                "use a new output_dir"
            )


def _run(args: argparse.Namespace) -> int:
    cfg, total = prepare_run(args.config, args.overrides)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    from pipeline.runner import run_crawl  # imports Ray: only once the input is known good

    summary = run_crawl(cfg, total, args.address)
    print(json.dumps(summary, indent=2))
    return 1 if summary["failed_shards"] else 0


def _manifest(args: argparse.Namespace) -> int:
    from pipeline import manifest

    run_dir = Path(args.run_dir)
    if not (run_dir / "crawl").is_dir():
        raise InputError(f"{run_dir} is not a run directory (no crawl/ inside)")
    report = getattr(manifest, args.action)(run_dir)
    print(json.dumps(report, indent=2) if args.json else manifest.render(args.action, report))
    return 1 if args.action == "validate" and not report["ok"] else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)
    args = _parser().parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _manifest(args)
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
