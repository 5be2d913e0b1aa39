"""Command line of the pipeline.

    python -m pipeline run configs/pipeline/crawl.yaml input.urls=urls.parquet output_dir=RUN
    python -m pipeline run configs/pipeline/curate.yaml input.urls=urls.parquet output_dir=RUN \
        embed.checkpoint=dinov2_vitl14_pretrain.pth [stages=[embed,semdedup]] [redo=[semdedup]]
    python -m pipeline run ... --address ray://HEAD:10001     # or RAY_ADDRESS; local Ray otherwise
    python -m pipeline manifest {summary,shards,failures,validate,clusters} RUN [--json]
    python -m pipeline manifest gallery RUN [--out PAGE.html]     # a static page of the curation
    python -m pipeline fork RUN NEW_RUN --through cluster    # NEW_RUN reuses RUN's finished stages
    python -m pipeline submit CONFIG [key=value ...] --address http://HEAD:8265 \
        [--runtime-env code|pip|none|FILE] [--image URI] [--no-wait]   # a Ray job: pipeline/submit.py
    python -m pipeline status JOB_ID [--json]      # and: logs JOB_ID [--follow]; both take --address

Every input problem (config, URL file, column, empty list, a stage's changed settings) is
reported before Ray starts; `submit` checks the config, its paths and the cluster's address and
authentication before the job is sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline import plan
from pipeline import submit as jobs
from pipeline.config import (
    PipelineConfig,
    check_crawl_config,
    check_dedup_config,
    check_embed_config,
    check_ray_config,
)
from pipeline.layout import RunLayout
from pipeline.sources import InputError, check_input
from pretrain.configtools import ConfigError, load_config, save_config

log = logging.getLogger("pipeline")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe's stages: crawl, dedup, embed, semdedup")
    run.add_argument("config", help="YAML recipe, e.g. configs/pipeline/crawl.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides")
    run.add_argument("--address", default=None, help="Ray cluster address (else RAY_ADDRESS)")
    manifest = sub.add_parser("manifest", help="inspect a run directory")
    manifest.add_argument(
        "action", choices=["summary", "shards", "failures", "validate", "clusters", "gallery"]
    )
    manifest.add_argument("run_dir")
    manifest.add_argument("--json", action="store_true", help="machine-readable output")
    manifest.add_argument("--out", default=None, help="gallery: the page (RUN/gallery/index.html)")
    fork = sub.add_parser(
        "fork", help="start a run directory from another's finished stages (hard links)"
    )
    fork.add_argument("run_dir")
    fork.add_argument("new_run_dir")
    fork.add_argument("--through", default="cluster", help="last stage to reuse (cluster)")
    fork.add_argument("--exist-ok", action="store_true",
                      help="succeed when NEW_RUN_DIR was already forked from those stages")  # fmt: skip
    _job_parsers(sub)
    return parser


def _job_parsers(sub: argparse._SubParsersAction) -> None:
    address = "the head's job API, http://HEAD:8265 (else RAY_API_SERVER_ADDRESS, RAY_ADDRESS)"
    submit = sub.add_parser("submit", help="run a recipe on a Ray cluster as a Ray job")
    submit.add_argument("config", help="YAML recipe, e.g. configs/pipeline/crawl.yaml")
    submit.add_argument("overrides", nargs="*", help="key=value overrides (absolute paths)")
    submit.add_argument("--address", default=None, help=address)
    submit.add_argument("--runtime-env", default=None, metavar="code|pip|none|FILE",
                        help="what the job carries (pipeline/submit.py): this checkout's code "
                        "(code, the default), code + its dependencies by pip (pip), nothing "
                        "(none, the default with --image), or a runtime_env YAML/JSON file")  # fmt: skip
    submit.add_argument("--image", default="", help="container image holding dinoforge (image_uri)")
    submit.add_argument("--job-id", default=None, help="submission id (default: Ray's)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    status = sub.add_parser("status", help="a Ray job's status")
    status.add_argument("job_id")
    status.add_argument("--address", default=None, help=address)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    logs = sub.add_parser("logs", help="a Ray job's log")
    logs.add_argument("job_id")
    logs.add_argument("--address", default=None, help=address)
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")


def prepare_run(config: str, overrides: list[str]) -> tuple[PipelineConfig, int]:
    """Load and check everything a run needs; raise ConfigError/InputError before any work.
    Returns the config and the number of input rows (0 when the crawl is not planned)."""
    cfg = load_config(PipelineConfig, config, overrides)
    stages = plan.check_plan(cfg, RunLayout(cfg.output_dir))
    check_sections(cfg, stages)
    if "embed" in stages or (set(stages) & {"semdedup", "curate"} and _needs_model(cfg)):
        _check_checkpoint(cfg.embed.checkpoint)
    _check_image_sets(cfg, stages)
    total = check_input(cfg.input) if "crawl" in stages else 0
    return cfg, total


def check_sections(cfg: PipelineConfig, stages: list[str]) -> None:
    """The settings of every planned stage, in range: no file is read."""
    try:
        check_ray_config(cfg.ray)
        if "crawl" in stages:
            check_crawl_config(cfg.crawl)
        if "dedup" in stages:
            check_dedup_config(cfg.dedup)
        if "embed" in stages or (set(stages) & {"semdedup", "curate"} and _needs_model(cfg)):
            check_embed_config(cfg.embed)
        if "semdedup" in stages:
            from pipeline.stages.semdedup import check_decontaminate_config, check_semdedup_config

            check_semdedup_config(cfg.semdedup)
            check_decontaminate_config(cfg.decontaminate)
        if "cluster" in stages:
            from pipeline.stages.cluster import check_cluster_config

            check_cluster_config(cfg.cluster)
        if "curate" in stages:
            from pipeline.stages.curate import check_curate_config

            check_curate_config(cfg.curate)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_image_sets(cfg: PipelineConfig, stages: list[str]) -> None:
    """Seed and evaluation sets must hold images before a cluster spins up for them."""
    sets = [(s, "decontaminate.sets") for s in cfg.decontaminate.sets if "semdedup" in stages]
    if "curate" in stages and cfg.curate.seeds:
        from pipeline.sources import URL_FORMATS

        if Path(cfg.curate.seeds).suffix.lower() in URL_FORMATS:  # a URL list: crawled first
            from pipeline.config import InputConfig

            try:
                check_input(InputConfig(kind="urls", urls=cfg.curate.seeds))
            except InputError as exc:
                raise ConfigError(f"curate.seeds: {exc}") from None
        else:
            sets.append((cfg.curate.seeds, "curate.seeds"))
    if not sets:
        return
    from pipeline.stages.embed import EmbedInputError, eval_set_files  # imports torch: 1-2 s

    for spec, key in sets:
        try:
            eval_set_files(spec, key)
        except EmbedInputError as exc:
            raise ConfigError(str(exc)) from None


def _needs_model(cfg: PipelineConfig) -> bool:
    """Decontamination and seed sets are embedded with the pool's model."""
    return bool(cfg.decontaminate.sets or cfg.curate.seeds)


def _check_checkpoint(path: str) -> None:
    """The embedder's weights must exist before a cluster spins up for them."""
    from pretrain.models.loading import weights_file

    try:
        weights_file(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"embed.checkpoint: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    cfg, total = prepare_run(args.config, args.overrides)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    from pipeline.runner import run_pipeline  # imports Ray: only once the input is known good

    summary = run_pipeline(cfg, total, args.address)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["ok"] else 1


def _submit(args: argparse.Namespace) -> int:
    """Check what can be checked here (the config, strictly; its paths), then submit. The run
    directory and the inputs live on the cluster's storage: the job checks them there."""
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    check_sections(cfg, plan.resolve_plan(cfg))
    mode = args.runtime_env or ("none" if args.image else "code")
    runtime_env = jobs.build_runtime_env(mode, image=args.image)
    project = Path(runtime_env["working_dir"]) if "working_dir" in runtime_env else None
    jobs.check_cluster_paths(cfg, project)
    entry = jobs.entrypoint(args.config, args.overrides, project)
    return jobs.submit(args.address, entry, runtime_env, args.job_id, wait=not args.no_wait)


def _job(args: argparse.Namespace) -> int:
    if args.command == "logs":
        final = jobs.logs(args.address, args.job_id, args.follow)
    else:
        report = jobs.status(args.address, args.job_id)
        print(jobs.dump(report) if args.json else jobs.render_status(report))
        final = report["status"]
    return 1 if final in ("FAILED", "STOPPED") else 0


def _manifest(args: argparse.Namespace) -> int:
    from pipeline import manifest

    run_dir = Path(args.run_dir)
    if not (run_dir / "crawl").is_dir():
        raise InputError(f"{run_dir} is not a run directory (no crawl/ inside)")
    if args.action == "gallery":
        from pipeline.gallery import gallery

        report = gallery(run_dir, Path(args.out) if args.out else None)
        print(json.dumps(report, indent=2) if args.json else f"gallery: {report['page']} "
              f"({report['thumbnails']} thumbnails, {report['unreadable']} unreadable)")  # fmt: skip
        return 0
    report = getattr(manifest, args.action)(run_dir)
    print(json.dumps(report, indent=2) if args.json else manifest.render(args.action, report))
    return 1 if args.action == "validate" and not report["ok"] else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # `submit CONFIG --address URL key=value`: overrides after an option are overrides still.
    if extra and (args.command != "submit" or any(e.startswith("-") or "=" not in e
                                                  for e in extra)):  # fmt: skip
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        if args.command == "fork":
            stages = plan.fork_run(args.run_dir, args.new_run_dir, args.through, args.exist_ok)
            print(f"{args.new_run_dir}: reuses {', '.join(stages)} of {args.run_dir}")
            return 0
        if args.command in ("submit", "status", "logs"):
            return _submit(args) if args.command == "submit" else _job(args)
        return _run(args) if args.command == "run" else _manifest(args)
    except (ConfigError, InputError, jobs.SubmitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad data met by a stage (empty pool, seeds of another model...)
        log.debug("stage error", exc_info=True)
        print(f"error: {str(exc).splitlines()[-1] if exc.args else exc!r}", file=sys.stderr)
        return 2
