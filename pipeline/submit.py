"""Run a recipe on a Ray cluster as a Ray job that carries its own environment, and follow it.

    python -m pipeline submit configs/pipeline/crawl.yaml input.urls=/shared/urls.parquet \
        output_dir=/shared/RUN --address http://HEAD:8265   # or RAY_API_SERVER_ADDRESS/RAY_ADDRESS
    python -m pipeline submit ... --runtime-env pip      # nodes whose Python lacks the dependencies
    python -m pipeline status JOB_ID [--json]            # also --address
    python -m pipeline logs JOB_ID [--follow]

The job's entrypoint is `python -m pipeline run CONFIG OVERRIDES...`; its `runtime_env`
(`--runtime-env`) decides what travels with it:

- `code` (default): `working_dir` = this checkout (its code and configs; .venv, run directories,
  caches and files of 10 MiB or more left out). Every node imports this very checkout's
  `pipeline` and `pretrain`, whatever dinoforge it has or lacks; the dependencies (torch,
  pyarrow, FAISS...) come from the Python the cluster runs Ray with.
- `pip`: `code`, and Ray installs dinoforge's dependencies (pyproject's ranges, FAISS from the
  `cpu` extra, Ray itself left out: the cluster's own is kept) into a virtualenv on each node,
  over that node's Python: whatever it already has is kept, the rest is downloaded.
- `none`: nothing; the cluster's Python has dinoforge installed (an image built from this
  repository), the config path is the cluster's.
- a YAML or JSON file: a runtime_env of your own, used as it is.

`--image URI` runs the job in containers of that image (`image_uri`; with it Ray allows only
`env_vars` and `config`, so no code travels: the image must hold dinoforge).

Ray's token authentication: a client holding a token (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`
or `~/.ray/auth_token`) sends it, as `ray.init()` does for a local cluster, unless
`RAY_AUTH_MODE` says otherwise; a refusal, a wrong address or a missing job is one line naming
what to set (exit code 2).

Besides the runner, this is the one pipeline module that talks to Ray: through the job API
(`ray.job_submission`, an HTTP client of the head's dashboard), imported inside the functions
that need it, so that nothing else pays for importing Ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import yaml

log = logging.getLogger("pipeline.submit")

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
RUNTIME_ENV_MODES = ("code", "pip", "none")
# Never shipped: environments, run outputs, caches. Ray also leaves out what .gitignore lists.
EXCLUDES = [".git", ".venv", "venv", ".wheels", "runs", "demo_run", "bench_runs", "*.egg-info",
            "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache"]  # fmt: skip
# Ray warns from 10 MiB a file and refuses a package over 512 MiB: a checkpoint or a URL list
# in the checkout belongs on shared storage, not in every job's upload.
MAX_SHIPPED_FILE_BYTES = 10 * 1024 * 1024
# Keys whose values are paths the job reads (besides output_dir, which it writes).
INPUT_PATH_KEYS = ("input.urls", "embed.checkpoint", "curate.seeds", "decontaminate.sets")


class SubmitError(Exception):
    """A problem with the cluster, its address, its authentication or the job: one line."""


# -- what the job carries ---------------------------------------------------------------------


def project_root() -> Path:
    """The checkout this dinoforge was imported from: what `code` and `pip` ship."""
    if (PROJECT / "pyproject.toml").is_file() and (PROJECT / "configs").is_dir():
        return PROJECT
    raise SubmitError(
        f"dinoforge is installed at {PROJECT}, not run from a checkout: there is no project "
        "to ship; use --runtime-env none (the cluster has dinoforge) or a runtime_env file"
    )


def shipped_excludes(project: Path) -> list[str]:
    """EXCLUDES plus every file of MAX_SHIPPED_FILE_BYTES or more, anchored at the project."""
    skip_dirs = {e for e in EXCLUDES if "*" not in e}
    big = []
    for root, dirs, files in os.walk(project):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.endswith(".egg-info")]
        for name in files:
            path = Path(root) / name
            if not path.is_symlink() and path.stat().st_size >= MAX_SHIPPED_FILE_BYTES:
                big.append("/" + path.relative_to(project).as_posix())
    return EXCLUDES + sorted(big)


def dependencies(project: Path, extras: tuple[str, ...] = ("cpu",)) -> list[str]:
    """dinoforge's requirements as pyproject.toml states them, with `extras`, without Ray."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the installed distribution's metadata
        from importlib.metadata import requires

        from packaging.requirements import Requirement

        reqs = [Requirement(r) for r in requires("dinoforge") or []]
        wanted = [r for r in reqs if not r.marker or any(r.marker.evaluate({"extra": e})
                                                         for e in extras)]  # fmt: skip
        names = [str(r).split(";")[0].strip() for r in wanted]
    else:
        meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
        names = list(meta["dependencies"])
        for extra in extras:
            names += meta.get("optional-dependencies", {}).get(extra, [])
    # The cluster runs its own Ray: a job that installed another one could not talk to it.
    return [n for n in names if re.split(r"[\s\[<>=!~;]", n, maxsplit=1)[0].lower() != "ray"]


def build_runtime_env(mode: str, project: Path | None = None, image: str = "") -> dict[str, Any]:
    """The job's runtime_env for `--runtime-env MODE_OR_FILE` and `--image`."""
    if mode not in RUNTIME_ENV_MODES:
        return _runtime_env_file(mode, image)
    if image and mode != "none":
        raise SubmitError(
            f"--image {image} with --runtime-env {mode}: Ray runs an image_uri job with nothing "
            "but env_vars beside it, so the image must hold dinoforge; use --runtime-env none"
        )
    env: dict[str, Any] = {"image_uri": image} if image else {}
    if mode in ("code", "pip"):
        project = project or project_root()
        env.update(working_dir=str(project), excludes=shipped_excludes(project))
    if mode == "pip":
        env["pip"] = {"packages": dependencies(project), "pip_check": False}
    return env


def _runtime_env_file(path: str, image: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise SubmitError(
            f"--runtime-env {path}: neither one of {', '.join(RUNTIME_ENV_MODES)} nor a file"
        )
    env = yaml.safe_load(file.read_text())  # YAML also reads JSON
    if not isinstance(env, dict):
        raise SubmitError(f"--runtime-env {path}: expected a mapping (a Ray runtime_env)")
    if image:
        env = {**env, "image_uri": image}
    return env


def entrypoint(config: str, overrides: list[str], project: Path | None) -> str:
    """`python -m pipeline run CONFIG OVERRIDES...`, the config named as the job will see it:
    relative to the shipped project when it lies inside, else as given."""
    path = Path(config).resolve()
    if project is not None and path.is_relative_to(project.resolve()):
        config = path.relative_to(project.resolve()).as_posix()
    return shlex.join(["python", "-m", "pipeline", "run", config, *overrides])


def check_cluster_paths(cfg: Any, project: Path | None) -> None:
    """Every node reads and writes the run's paths: they must mean the same there.

    A relative output_dir would land in the job's unpacked copy of the project, a temporary
    directory on whichever node ran the task; a relative input is read from that copy, so it
    must be a file inside the shipped project."""
    if not Path(cfg.output_dir).is_absolute():
        raise SubmitError(
            f"output_dir={cfg.output_dir} is relative: on a cluster every node writes the run "
            "there, so give an absolute path on storage every node mounts (NFS, a shared "
            "volume), e.g. output_dir=/shared/runs/NAME"
        )
    for key in INPUT_PATH_KEYS:
        values = _get(cfg, key)
        for value in values if isinstance(values, list | tuple) else [values]:
            if not value or Path(value).is_absolute() or "://" in str(value):
                continue
            inside = project is not None and (project / value).exists()
            if not inside or _excluded(project, value):
                raise SubmitError(
                    f"{key}={value} is relative and not shipped with the job's project copy: "
                    "put it on storage every node mounts and give its absolute path"
                )


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return list(node) if hasattr(node, "__iter__") and not isinstance(node, str) else node


def _excluded(project: Path, value: str) -> bool:
    path = project / value
    top = Path(value).parts[0]
    return top in EXCLUDES or (path.is_file() and path.stat().st_size >= MAX_SHIPPED_FILE_BYTES)


# -- talking to the cluster --------------------------------------------------------------------


def dashboard_address(address: str | None) -> tuple[str, str]:
    """(job API URL, where it came from): --address, then RAY_API_SERVER_ADDRESS, then an http
    RAY_ADDRESS (`ray job submit`'s order), then Ray's default dashboard on this machine."""
    for value, source in ((address, "--address"),
                          (os.environ.get("RAY_API_SERVER_ADDRESS"), "RAY_API_SERVER_ADDRESS"),
                          (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")):  # fmt: skip
        if not value:
            continue
        if value.startswith("ray://") or (source == "RAY_ADDRESS" and "://" not in value):
            raise SubmitError(
                f"{source}={value} is the address `pipeline run` joins (GCS or Ray Client); jobs "
                "go to the dashboard's job API: pass --address http://HEAD:8265 (or set "
                "RAY_API_SERVER_ADDRESS)"
            )
        url = value if "://" in value else f"http://{value}"
        port = urlsplit(url).port
        if port in (6379, 10001):
            raise SubmitError(
                f"{source}={value}: port {port} is Ray's {'GCS' if port == 6379 else 'Ray Client'} "
                "port; jobs go to the dashboard's job API: --address http://HEAD:8265"
            )
        return url.rstrip("/"), source
    return DEFAULT_DASHBOARD, "the default (no --address, RAY_API_SERVER_ADDRESS or RAY_ADDRESS)"


def use_token_if_present() -> bool:
    """Send the token this machine holds, as ray.init() does for a local cluster: with
    RAY_AUTH_MODE unset, Ray's job client sends none and a cluster with token auth (the default
    of `ray start` wherever a token exists) answers 401."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"].lower() == "token"
    try:
        from ray._private.authentication import authentication_token_setup as token_setup
    except ImportError:  # a Ray without token authentication
        return False
    quiet = logging.getLogger(token_setup.__name__)
    level, quiet.level = quiet.level, logging.ERROR  # its warning speaks to a cluster's owner
    try:
        return token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


@contextmanager
def job_api(address: str | None) -> Iterator[Any]:
    """A JobSubmissionClient of the cluster; every failure to reach or use it a SubmitError."""
    url, source = dashboard_address(address)
    token = use_token_if_present()
    # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
             if k in os.environ}  # fmt: skip
    try:
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(url)
        finally:
            os.environ.update(saved)
        yield client
    except SubmitError:
        raise
    except Exception as exc:
        raise SubmitError(_explain(exc, url, source, token)) from None


def _explain(exc: Exception, url: str, source: str, token: bool) -> str:
    from ray.exceptions import AuthenticationError

    text = str(getattr(exc, "message", "") or exc)
    if isinstance(exc, AuthenticationError) and "Authentication failed" in text:
        return (f"the Ray cluster at {url} refused this machine's token (403): it is not the "
                "head's; copy the head's ~/.ray/auth_token here (`ray get-auth-token` on the "
                "head prints it) or set RAY_AUTH_TOKEN to it")  # fmt: skip
    if isinstance(exc, AuthenticationError):
        held = "the token it holds was not sent" if token else "this machine holds no token"
        return (f"the Ray cluster at {url} requires an authentication token (401) and {held}: "
                "set RAY_AUTH_MODE=token and give this machine the head's token: copy the "
                "head's ~/.ray/auth_token to ~/.ray/auth_token here, or set RAY_AUTH_TOKEN (or "
                "RAY_AUTH_TOKEN_PATH); `ray get-auth-token` on the head prints it")  # fmt: skip
    if isinstance(exc, ConnectionError) or type(exc).__module__.startswith("requests"):
        return (f"no Ray job server answers at {url} (from {source}): pass --address "
                "http://HEAD:8265 or set RAY_ADDRESS=http://HEAD:8265, the head's dashboard "
                "(`ray start --head --dashboard-host 0.0.0.0` for other machines to reach it)")  # fmt: skip
    match = re.search(r"status code 404: (.*)", text, flags=re.S)
    if match:
        return f"{match.group(1).strip().rstrip('.')} on the Ray cluster at {url}"
    return f"the Ray job API at {url}: {text.strip().splitlines()[-1] if text.strip() else exc!r}"


# -- the commands ------------------------------------------------------------------------------


def submit(address: str | None, entry: str, runtime_env: dict[str, Any], job_id: str | None = None,
           wait: bool = True) -> int:  # fmt: skip
    """Submit the job, print its id, follow its log until it ends; the exit code of the command:
    0 once it succeeded (without `wait`: was accepted), 1 when it failed or was stopped, 130 when
    the following was interrupted (the job goes on)."""
    # Ray logs every default exclude (.git, .venv) and .gitignore it honours: EXCLUDES names them.
    for name in ("ray._private.runtime_env.working_dir", "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with job_api(address) as client:
        job = _submit_when_ready(client, entry, runtime_env, job_id)
        print(job, flush=True)
        log.info("submitted %s to %s: %s", job, client.get_address(), entry)
        if not wait:
            return 0
        final = follow(client, job)
    return 0 if final == "SUCCEEDED" else 130 if final == "RUNNING" else 1


def _submit_when_ready(client: Any, entry: str, runtime_env: dict[str, Any],
                       job_id: str | None, wait_s: float = 60.0) -> str:  # fmt: skip
    """The head's job agent registers some seconds after its dashboard answers (right after
    `ray start`); until then Ray answers 'No available agent ... try again later'."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entry, runtime_env=runtime_env,
                                     submission_id=job_id)  # fmt: skip
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow(client: Any, job_id: str, out: TextIO | None = None) -> str:
    """Print the job's log as it grows until it finishes; return its final status."""
    out = out or sys.stdout
    tail: list[str] = []

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            tail[:] = (tail + chunk.splitlines())[-200:]

    try:
        asyncio.run(_tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on: `python -m pipeline status {job_id}`, "
              f"`python -m pipeline logs {job_id}`, `ray job stop {job_id}`", file=sys.stderr)  # fmt: skip
        return "RUNNING"
    info = client.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    print(f"job {job_id}: {status}", file=sys.stderr)
    missing = next((m for m in map(_missing_module, tail) if m), None)
    if status == "FAILED" and missing:
        print(f"hint: the job's `python` on the cluster cannot import {missing}: start Ray from "
              "dinoforge's environment (`source .venv/bin/activate` before `ray start`, on every "
              "node) or submit with --runtime-env pip", file=sys.stderr)  # fmt: skip
    return status


def _missing_module(line: str) -> str | None:
    match = re.search(r"No module named '([\w.]+)'", line)
    return match.group(1) if match else None


def status(address: str | None, job_id: str) -> dict[str, Any]:
    with job_api(address) as client:
        info = client.get_job_info(job_id)
    fields = ("submission_id", "status", "message", "entrypoint", "start_time", "end_time",
              "runtime_env")  # fmt: skip
    report = {f: getattr(info, f, None) for f in fields}
    report["status"] = str(getattr(info.status, "value", info.status))
    return report


def render_status(report: dict[str, Any]) -> str:
    return (f"{report['submission_id']}: {report['status']} ({report['message']})\n"
            f"  entrypoint: {report['entrypoint']}")  # fmt: skip


def logs(address: str | None, job_id: str, keep_following: bool = False) -> str:
    with job_api(address) as client:
        if keep_following:
            return follow(client, job_id)
        sys.stdout.write(client.get_job_logs(job_id))
        return str(client.get_job_status(job_id))


def dump(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)
