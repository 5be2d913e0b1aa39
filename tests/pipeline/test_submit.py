"""`python -m pipeline submit/status/logs` without a cluster: the runtime_env a job carries, the
paths it may name, the job API's address, and the one-line errors for a wrong address or a
missing or refused token (a loopback HTTP server answering as Ray's dashboard does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline import submit as jobs
from pipeline.config import PipelineConfig
from pretrain.configtools import load_config

from .conftest import _free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path) -> Path:
    """A checkout with what must travel (code, configs, a small input) and what must not."""
    root = tmp_path / "proj"
    for rel, size in [("pyproject.toml", 10), ("configs/pipeline/crawl.yaml", 10),
                      ("pipeline/stage.py", 100), ("data/urls.parquet", 1000),
                      (".venv/lib/torch.so", 100), ("runs/r1/crawl/00000.tar", 100),
                      ("models/dinov2_vitl14.pth", jobs.MAX_SHIPPED_FILE_BYTES)]:  # fmt: skip
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            f.truncate(size)  # sparse: the size is what counts
    return root


def test_code_runtime_env_ships_the_checkout_without_environments_runs_or_big_files(project,
                                                                                   tmp_path):  # fmt: skip
    env = jobs.build_runtime_env("code", project)
    assert env["working_dir"] == str(project) and "pip" not in env
    assert {".venv", ".git", "runs", "demo_run"} <= set(env["excludes"])
    assert "/models/dinov2_vitl14.pth" in env["excludes"]
    # What Ray's own packaging makes of it: the zip that every node unpacks.
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "package.zip"
    create_package(str(project), package, include_gitignore=True, excludes=env["excludes"])
    shipped = {n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/")}
    assert shipped == {"pyproject.toml", "configs/pipeline/crawl.yaml", "pipeline/stage.py",
                       "data/urls.parquet"}  # fmt: skip


def test_pip_runtime_env_installs_the_project_dependencies_but_not_ray():
    env = jobs.build_runtime_env("pip", REPO)
    packages = env["pip"]["packages"]
    assert "torch>=2.4" in packages and "pyarrow>=14" in packages and "faiss-cpu>=1.8" in packages
    assert not [p for p in packages if p.lower().startswith("ray")]  # the cluster's Ray is kept
    assert env["working_dir"] == str(REPO) and env["pip"]["pip_check"] is False


def test_none_image_and_file_runtime_envs(tmp_path):
    assert jobs.build_runtime_env("none") == {}
    image = "ghcr.io/org/dinoforge:1"
    assert jobs.build_runtime_env("none", image=image) == {"image_uri": image}
    with pytest.raises(jobs.SubmitError, match="--runtime-env none"):
        jobs.build_runtime_env("code", REPO, image=image)  # Ray allows nothing beside an image
    own = tmp_path / "env.yaml"
    own.write_text("working_dir: /src\nenv_vars: {A: '1'}\n")
    assert jobs.build_runtime_env(str(own)) == {"working_dir": "/src", "env_vars": {"A": "1"}}
    with pytest.raises(jobs.SubmitError, match="neither one of code, pip, none nor a file"):
        jobs.build_runtime_env("conda")
    own.write_text("- a list\n")
    with pytest.raises(jobs.SubmitError, match="expected a mapping"):
        jobs.build_runtime_env(str(own))


def test_entrypoint_names_the_config_as_the_job_sees_it():
    config = str(REPO / "configs/pipeline/crawl.yaml")
    assert jobs.entrypoint(config, ["output_dir=/shared/a b", "x=[1,2]"], REPO) == (
        "python -m pipeline run configs/pipeline/crawl.yaml 'output_dir=/shared/a b' 'x=[1,2]'"
    )
    assert jobs.entrypoint("/etc/recipe.yaml", [], REPO).endswith(" /etc/recipe.yaml")
    assert jobs.entrypoint("configs/x.yaml", [], None).endswith(" configs/x.yaml")


def _cfg(*overrides: str):
    return load_config(PipelineConfig, REPO / "configs/pipeline/curate.yaml", list(overrides))


def test_paths_must_mean_the_same_on_every_node(project):
    with pytest.raises(jobs.SubmitError, match="output_dir=RUN is relative.*absolute path"):
        jobs.check_cluster_paths(_cfg("output_dir=RUN", "input.urls=/s/u.parquet"), project)
    with pytest.raises(jobs.SubmitError, match="input.urls=mine.parquet is relative and not"):
        jobs.check_cluster_paths(_cfg("output_dir=/s/RUN", "input.urls=mine.parquet"), project)
    with pytest.raises(jobs.SubmitError, match="embed.checkpoint=models/dinov2_vitl14.pth"):
        jobs.check_cluster_paths(_cfg("output_dir=/s/RUN", "input.urls=/s/u.parquet",
                                      "embed.checkpoint=models/dinov2_vitl14.pth"), project)  # fmt: skip
    with pytest.raises(jobs.SubmitError, match=r"decontaminate.sets=val"):
        jobs.check_cluster_paths(_cfg("output_dir=/s/RUN", "input.urls=/s/u.parquet",
                                      "decontaminate.sets=[val]"), project)  # fmt: skip
    # a small file inside the shipped project is there on every node
    jobs.check_cluster_paths(_cfg("output_dir=/s/RUN", "input.urls=data/urls.parquet"), project)
    with pytest.raises(jobs.SubmitError, match="input.urls=data/urls.parquet"):
        jobs.check_cluster_paths(_cfg("output_dir=/s/RUN", "input.urls=data/urls.parquet"), None)


def test_job_api_address(monkeypatch):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert jobs.dashboard_address(None)[0] == "http://127.0.0.1:8265"
    assert jobs.dashboard_address("head:8265") == ("http://head:8265", "--address")
    monkeypatch.setenv("RAY_ADDRESS", "http://other:8265/")
    assert jobs.dashboard_address(None) == ("http://other:8265", "RAY_ADDRESS")
    assert jobs.dashboard_address("https://head") == ("https://head", "--address")
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")  # what `pipeline run` takes
    with pytest.raises(jobs.SubmitError, match=r"RAY_ADDRESS=head:6379 .*--address http://HEAD"):
        jobs.dashboard_address(None)
    with pytest.raises(jobs.SubmitError, match="port 6379 is Ray's GCS port"):
        jobs.dashboard_address("http://head:6379")
    with pytest.raises(jobs.SubmitError, match="Ray Client"):
        jobs.dashboard_address("ray://head:10001")


class _Dashboard(BaseHTTPRequestHandler):
    """Answers as a Ray 2.60 dashboard with token authentication on (TOKEN) does."""

    TOKEN = "0123456789abcdef0123456789abcdef"
    seen: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        auth = self.headers.get("authorization", "")
        self.seen.append(auth)
        if not auth:
            return self._send(401, "Unauthorized: Missing authentication token", "text/plain")
        if auth != f"Bearer {self.TOKEN}":
            return self._send(403, "Forbidden: Invalid authentication token", "text/plain")
        if self.path == "/api/version":
            return self._send(200, json.dumps({"version": "4", "ray_version": "2.60.0",
                                               "ray_commit": "x"}), "application/json")  # fmt: skip
        self._send(404, "Job raysubmit_nope does not exist.", "text/plain")

    def _send(self, status: int, body: str, ctype: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def dashboard():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a HOME of its own (no ~/.ray/auth_token unless the test puts
    one there) and RAY_AUTH_MODE unset, as on a fresh machine."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, timeout=120,
                          env={**base, "HOME": str(home), **env}, capture_output=True,
                          text=True)  # fmt: skip


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def test_a_wrong_address_says_what_to_set(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    line = _error_line(_cli(tmp_path, "status", "raysubmit_x", "--address", url))
    assert f"no Ray job server answers at {url} (from --address)" in line
    assert "--address http://HEAD:8265" in line and "RAY_ADDRESS" in line
    line = _error_line(_cli(tmp_path, "logs", "raysubmit_x", RAY_ADDRESS=url))
    assert "(from RAY_ADDRESS)" in line


def test_a_missing_token_says_to_set_ray_auth_mode_token(tmp_path, dashboard):
    line = _error_line(_cli(tmp_path, "status", "raysubmit_nope", "--address", dashboard))
    assert "requires an authentication token (401) and this machine holds no token" in line
    assert "RAY_AUTH_MODE=token" in line and "~/.ray/auth_token" in line


def test_the_token_this_machine_holds_is_sent(tmp_path, dashboard):
    """With RAY_AUTH_MODE unset, Ray's own client sends no token; submit finds ~/.ray/auth_token
    as `ray.init()` does and sends it (the fake dashboard then says the job does not exist)."""
    (tmp_path / "home/.ray").mkdir(parents=True)
    (tmp_path / "home/.ray/auth_token").write_text(_Dashboard.TOKEN)
    _Dashboard.seen.clear()
    line = _error_line(_cli(tmp_path, "status", "raysubmit_nope", "--address", dashboard))
    assert line == f"error: Job raysubmit_nope does not exist on the Ray cluster at {dashboard}"
    assert set(_Dashboard.seen) == {f"Bearer {_Dashboard.TOKEN}"}
    # a token that is not the head's
    line = _error_line(_cli(tmp_path, "status", "raysubmit_nope", "--address", dashboard,
                            RAY_AUTH_TOKEN="f" * 32))  # fmt: skip
    assert "refused this machine's token (403)" in line and "~/.ray/auth_token" in line


def test_submit_checks_its_input_before_the_cluster(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens: reached only if the checks pass
    args = ["submit", "configs/pipeline/crawl.yaml", "--address", url]
    line = _error_line(_cli(tmp_path, *args, "input.urls=/s/u.parquet", "output_dir=RUN"))
    assert "output_dir=RUN is relative" in line
    line = _error_line(_cli(tmp_path, *args, "output_dir=/s/RUN", "crawl.treads=4"))
    assert "crawl.treads" in line  # strict merge, overrides after --address included
    line = _error_line(_cli(tmp_path, *args, "output_dir=/s/RUN", "input.urls=/s/u.parquet"))
    assert "no Ray job server answers" in line


class _FakeClient:
    def __init__(self, chunks: list[str], status: str) -> None:
        self.chunks, self.final = chunks, status

    async def tail_job_logs(self, job_id: str):
        for chunk in self.chunks:
            yield chunk

    def get_job_info(self, job_id: str):
        return type("Info", (), {"status": self.final})()


def test_following_a_job_that_lacks_a_module_names_the_fix(capsys):
    log = "Running entrypoint\nModuleNotFoundError: No module named 'pyarrow'\n"
    assert jobs.follow(_FakeClient([log], "FAILED"), "raysubmit_1") == "FAILED"
    out, err = capsys.readouterr()
    assert out == log
    assert "job raysubmit_1: FAILED" in err
    assert "cannot import pyarrow" in err and "--runtime-env pip" in err
    assert "source .venv/bin/activate" in err
    assert jobs.follow(_FakeClient(["done\n"], "SUCCEEDED"), "raysubmit_2") == "SUCCEEDED"
    assert "hint" not in capsys.readouterr().err
