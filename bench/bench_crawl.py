"""Crawl throughput and memory: dinoforge vs img2dataset 1.47.0, side by side in one run.

    python bench/bench_crawl.py                       # 10k URLs both, then 100k dinoforge (memory)
    python bench/bench_crawl.py --urls 2000 --memory-urls 0

Both crawl the same URL list from the same loopback server (a separate process serving
pre-generated JPEGs from memory), resize 256 keep_ratio, on both cores: img2dataset with
processes_count=2 and threads; dinoforge end to end through its CLI, Ray start-up included.
img2dataset lives in its own venv (bench_runs/venv-img2dataset; created here if missing).
Peak memory is the sampled RSS of each crawler's whole process tree (driver, workers, and for
dinoforge Ray's own daemons).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from crawl_memory import PeakRss  # noqa: E402

from pipeline.simweb import build_web, save_web  # noqa: E402

RUNS = REPO / "bench_runs"
I2D_VENV = RUNS / "venv-img2dataset"
PIP_ENV = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {
    "PIP_CONFIG_FILE": "/dev/null"
}


def ensure_img2dataset() -> Path:
    exe = I2D_VENV / "bin" / "img2dataset"
    if not exe.exists():
        subprocess.run(["python3", "-m", "venv", str(I2D_VENV)], check=True, env=PIP_ENV)
        pip = str(I2D_VENV / "bin" / "pip")
        subprocess.run([pip, "install", "-q", "img2dataset==1.47.0"], check=True, env=PIP_ENV)
    return exe


def start_server(n_unique: int, seed: int) -> tuple[subprocess.Popen, str]:
    web_dir = RUNS / f"web-{n_unique}-{seed}"
    if not (web_dir / "planted.json").exists():
        save_web(build_web(n_unique, seed=seed, min_distance=0), web_dir)
    port_file = RUNS / "server.port"
    port_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    server = subprocess.Popen([sys.executable, "-m", "pipeline.simweb", "--web-dir", str(web_dir),
                               "--port-file", str(port_file)], env=env)  # fmt: skip
    for _ in range(600):
        if port_file.exists() and port_file.read_text():
            return server, f"http://127.0.0.1:{port_file.read_text()}"
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("image server did not start")


def write_urls(path: Path, base: str, n_urls: int, n_unique: int) -> Path:
    # Distinct URLs (a query string per row) over the unique images, in a fixed shuffled order.
    urls = [f"{base}/img/{(i * 7919) % n_unique:06d}.jpg?row={i}" for i in range(n_urls)]
    pq.write_table(pa.table({"url": urls}), path)
    return path


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, int, int]:
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        with PeakRss(proc.pid) as rss:
            code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{cmd[0]} failed ({code}); see {log}")
    return time.perf_counter() - started, rss.peak, code


def run_dinoforge(urls: Path, out: Path, shard_size: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "run", "configs/pipeline/crawl.yaml", f"input.urls={urls}",
           f"output_dir={out}", f"crawl.shard_size={shard_size}", "crawl.allow_private_networks=true",
           f"crawl.threads_per_task={threads}", "crawl.image_size=256", "crawl.resize_mode=keep_ratio",
           "ray.num_cpus=2"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    wall, peak, _ = timed(cmd, env, out.with_suffix(".log"))
    ok = sum(json.loads(p.read_text())["successes"] for p in (out / "crawl").glob("*.stats.json"))
    return {"wall_s": wall, "successes": ok, "peak_rss_mb": peak / 2**20}


def run_img2dataset(urls: Path, out: Path, shard_size: int, threads: int) -> dict:
    cmd = [str(ensure_img2dataset()), f"--url_list={urls}", "--input_format=parquet", "--url_col=url",
           f"--output_folder={out}", "--output_format=webdataset", "--processes_count=2",
           f"--thread_count={threads}", "--image_size=256", "--resize_mode=keep_ratio",
           f"--number_sample_per_shard={shard_size}", "--distributor=multiprocessing",
           "--enable_wandb=False"]  # fmt: skip
    wall, peak, _ = timed(cmd, dict(os.environ), out.with_suffix(".log"))
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return {"wall_s": wall, "successes": ok, "peak_rss_mb": peak / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=int, default=10_000)
    parser.add_argument("--unique", type=int, default=1000, help="distinct images behind the URLs")
    parser.add_argument("--memory-urls", type=int, default=100_000, help="0 skips the large run")
    parser.add_argument("--shard-size", type=int, default=2500)
    parser.add_argument(
        "--threads", type=int, default=16, help="per process (img2dataset) / per task"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each crawler, order alternating"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = RUNS / f"crawl-{stamp}"
    work.mkdir(parents=True)
    ensure_img2dataset()
    server, base = start_server(args.unique, args.seed)
    results: dict = {"load_before": os.getloadavg()}
    try:
        urls = write_urls(work / "urls.parquet", base, args.urls, args.unique)
        # Alternate the order (A B B A ...) so drifting load from other jobs hits both alike.
        for r in range(args.repeats):
            order = [("img2dataset", run_img2dataset), ("dinoforge", run_dinoforge)]
            for name, runner in order if r % 2 == 0 else order[::-1]:
                result = runner(urls, work / f"{name}-{r}", args.shard_size, args.threads)
                result["load_1min_after"] = os.getloadavg()[0]
                results.setdefault(name, []).append(result)
                (work / "results.json").write_text(
                    json.dumps(results, indent=2)
                )  # kept if a later run fails
        if args.memory_urls:
            big = write_urls(work / "urls-big.parquet", base, args.memory_urls, args.unique)
            large = run_dinoforge(big, work / "dinoforge-large", args.shard_size, args.threads)
            results["dinoforge_large"] = [large | {"urls": args.memory_urls}]
        results["load_after"] = os.getloadavg()
    finally:
        server.kill()
        server.wait()
    for name in ("img2dataset", "dinoforge", "dinoforge_large"):
        for r in results.get(name, []):
            r["images_per_s"] = r["successes"] / r["wall_s"]
    mean_rate = {
        n: sum(r["images_per_s"] for r in results[n]) / len(results[n])
        for n in ("img2dataset", "dinoforge")
    }
    results["mean_images_per_s"] = mean_rate
    results["speedup"] = mean_rate["dinoforge"] / mean_rate["img2dataset"]
    results["args"] = vars(args)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
