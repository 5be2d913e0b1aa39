"""Crawl throughput and memory: dinoforge vs img2dataset 1.47.0, side by side in one run.

    python bench/bench_crawl.py                        # both rows at 10k URLs, 2k end to end, 100k memory
    python bench/bench_crawl.py --rows close --urls 2000 --memory-urls 0 --e2e-urls 0
    python bench/bench_crawl.py --rows close --slow-s 30 --e2e-urls 0 --memory-urls 0  # hanging hosts

Conditions (rows):
- ``close``: the realistic one. Python's plain threaded ``http.server`` answering HTTP/1.0, so
  every request opens a new TCP connection (a crawl over millions of hosts almost never reuses
  one), each image read from disk per request;
- ``keepalive``: HTTP/1.1 with keep-alive, images held in memory.

The URL list: ``--urls`` distinct URLs (a query string per row) over ``--unique`` JPEGs made by
``pipeline.simweb`` from the scikit-image photographs (300-1,600 px), with 3% faults spread
through it (404, 500, slow, truncated, HTML, empty, decompression bomb, redirect loop, a 20 MB
body). Both resize to 256 keep_ratio on both cores. img2dataset runs in its own venv
(bench_runs/venv-img2dataset; created here if missing) at its recommended settings
(``processes_count`` = cores, ``thread_count`` swept from 32, ``retries=0 timeout=10``);
dinoforge end to end through its CLI (Ray start-up included) at its defaults, its threads per
task swept likewise. Each condition reports the best setting of each, then the ratio.
Peak memory is the sampled RSS of each crawler's whole process tree (driver, workers, and for
dinoforge Ray's own daemons). Every crawl run, each condition's best settings and the memory
run are appended to `--jsonl` (default runs/bench/crawl.jsonl) as each ends, beside the
run folder's results.json.
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

from _rows import RowWriter, add_jsonl_arg  # noqa: E402
from crawl_memory import PeakRss  # noqa: E402

from pipeline.simweb import build_web, save_web  # noqa: E402

RUNS = REPO / "bench_runs"
EXTRA = [
    a for a in os.environ.get("DF_EXTRA", "").split() if a
]  # extra dinoforge overrides, for trials
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


FAULTS = ("fault/404", "fault/500", "fault/slow", "fault/truncated.jpg", "fault/html",
          "fault/empty", "fault/bomb.png", "fault/loop-a", "fault/huge")  # fmt: skip


def start_server(n_unique: int, seed: int, row: str,
                 slow_s: float = 3.0) -> tuple[subprocess.Popen, str]:  # fmt: skip
    web_dir = RUNS / f"web-{n_unique}-{seed}"
    if not (web_dir / "planted.json").exists():
        save_web(build_web(n_unique, seed=seed, min_distance=0), web_dir)
    port_file = RUNS / "server.port"
    port_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    extra = ["--http10", "--from-disk"] if row == "close" else []
    extra += ["--slow-s", str(slow_s)]
    server = subprocess.Popen([sys.executable, "-m", "pipeline.simweb", "--web-dir", str(web_dir),
                               "--port-file", str(port_file), *extra], env=env)  # fmt: skip
    for _ in range(600):
        if port_file.exists() and port_file.read_text():
            return server, f"http://127.0.0.1:{port_file.read_text()}"
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("image server did not start")


def write_urls(path: Path, base: str, n_urls: int, n_unique: int) -> Path:
    """Distinct URLs (a query string per row) over the unique images in a fixed shuffled order;
    every 33rd row (3%) a fault endpoint, cycling through FAULTS."""
    urls = []
    for i in range(n_urls):
        target = (
            FAULTS[(i // 33) % len(FAULTS)]
            if i % 33 == 32
            else f"img/{(i * 7919) % n_unique:06d}.jpg"
        )
        urls.append(f"{base}/{target}?row={i}")
    pq.write_table(pa.table({"url": urls}), path)
    return path


def steal_s() -> float:
    """CPU seconds the hypervisor has taken from this VM since boot (all CPUs): a run during
    which it grows by much ran on a noisy machine."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, int, int]:
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        with PeakRss(proc.pid) as rss:
            code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{cmd[0]} failed ({code}); see {log}")
    return time.perf_counter() - started, rss.peak, code


def run_dinoforge(urls: Path, out: Path, threads: int | None, shard_size: int) -> dict:
    """dinoforge at its defaults (threads, tasks in flight), but for ``threads`` when given."""
    cmd = [sys.executable, "-m", "pipeline", "run", "configs/pipeline/crawl.yaml", f"input.urls={urls}",
           f"output_dir={out}", "crawl.allow_private_networks=true", f"crawl.shard_size={shard_size}",
           "crawl.image_size=256", "crawl.resize_mode=keep_ratio"]  # fmt: skip
    if threads:
        cmd.append(f"crawl.threads_per_task={threads}")
    cmd += EXTRA
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    wall, peak, _ = timed(cmd, env, out.with_suffix(".log"))
    ok = sum(json.loads(p.read_text())["successes"] for p in (out / "crawl").glob("*.stats.json"))
    return {"wall_s": wall, "successes": ok, "peak_rss_mb": peak / 2**20}


def run_img2dataset(urls: Path, out: Path, threads: int | None, shard_size: int) -> dict:
    """img2dataset as its README recommends: processes = cores, many threads, no retries."""
    cmd = [str(ensure_img2dataset()), f"--url_list={urls}", "--input_format=parquet", "--url_col=url",
           f"--output_folder={out}", "--output_format=webdataset", f"--processes_count={os.cpu_count()}",
           f"--thread_count={threads or 32}", "--image_size=256", "--resize_mode=keep_ratio",
           "--retries=0", "--timeout=10", "--distributor=multiprocessing",
           f"--number_sample_per_shard={shard_size}",
           "--enable_wandb=False"]  # fmt: skip
    wall, peak, _ = timed(cmd, dict(os.environ), out.with_suffix(".log"))
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return {"wall_s": wall, "successes": ok, "peak_rss_mb": peak / 2**20}


RUNNERS = {"img2dataset": run_img2dataset, "dinoforge": run_dinoforge}


def sweep(work: Path, urls: Path, settings: dict[str, list], repeats: int, log: list,
          shard_size: int, rows: RowWriter, condition: str) -> dict:  # fmt: skip
    """Every (crawler, threads) setting ``repeats`` times, crawlers alternating (A B B A ...)
    so drifting load hits both alike; the best setting of each by mean images/s."""
    pairs = [(name, t) for i in range(max(map(len, settings.values())))
             for name in RUNNERS if i < len(settings[name]) for t in [settings[name][i]]]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    rates: dict[tuple, list[float]] = {}
    for r in range(repeats):
        for name, threads in pairs if r % 2 == 0 else pairs[::-1]:
            out = work / f"{name}-t{threads or 'default'}-{r}"
            stolen = steal_s()
            result = RUNNERS[name](urls, out, threads, shard_size)
            result["steal_s"] = round(steal_s() - stolen, 1)
            result |= {"crawler": name, "threads": threads, "repeat": r,
                       "images_per_s": result["successes"] / result["wall_s"],
                       "load_1min_after": os.getloadavg()[0]}  # fmt: skip
            rows.write({"kind": "run", "condition": condition, **result})
            print(json.dumps(result), flush=True)
            log.append(result)
            rates.setdefault((name, threads), []).append(result["images_per_s"])
    best = {}
    for name in RUNNERS:
        mean = {t: sum(v) / len(v) for (n, t), v in rates.items() if n == name}
        top = max(mean, key=mean.get)
        best[name] = {"threads": top, "images_per_s": mean[top], "all": mean}
    best["speedup"] = best["dinoforge"]["images_per_s"] / best["img2dataset"]["images_per_s"]
    rows.write({"kind": "best", "condition": condition, **best})
    return best


def _threads(text: str) -> list:
    return [None if t == "default" else int(t) for t in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="close,keepalive")
    parser.add_argument("--urls", type=int, default=10_000)
    parser.add_argument("--unique", type=int, default=2000, help="distinct images behind the URLs")
    parser.add_argument("--i2d-threads", default="32,64,128", help="img2dataset thread_count sweep")
    parser.add_argument(
        "--df-threads",
        default="default,16,32",
        help="dinoforge threads per task sweep (default: its config's, 64)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="passes over the sweep, alternating")
    parser.add_argument("--e2e-urls", type=int, default=2000, help="0 skips the small run")
    parser.add_argument("--memory-urls", type=int, default=100_000, help="0 skips the large run")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=2500,
        help="both crawlers: small enough that every core gets shards",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_jsonl_arg(parser, "crawl")
    parser.add_argument("--slow-s", type=float, default=3.0,
                        help="the slow fault's delay; above 10 s it is a hanging host that both "
                             "crawlers time out on")  # fmt: skip
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = RUNS / f"crawl-{stamp}"
    work.mkdir(parents=True)
    ensure_img2dataset()
    results: dict = {"args": vars(args), "load_before": os.getloadavg(), "runs": []}
    rows = RowWriter.from_args(args, "crawl")

    def save() -> None:
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))

    settings = {"img2dataset": _threads(args.i2d_threads), "dinoforge": _threads(args.df_threads)}
    for row in [r for r in args.rows.split(",") if r]:
        server, base = start_server(args.unique, args.seed, row, args.slow_s)
        try:
            urls = write_urls(work / f"urls-{row}.parquet", base, args.urls, args.unique)
            results[row] = sweep(work / row, urls, settings, args.repeats, results["runs"],
                                 args.shard_size, rows, row)  # fmt: skip
            save()
        finally:
            server.kill()
            server.wait()
    if args.e2e_urls or args.memory_urls:  # both on the realistic condition
        server, base = start_server(args.unique, args.seed, "close", args.slow_s)
        try:
            if args.e2e_urls:
                small = write_urls(work / "urls-e2e.parquet", base, args.e2e_urls, args.unique)
                picked = {"img2dataset": [32], "dinoforge": [None]}  # recommended / default
                results["e2e"] = sweep(work / "e2e", small, picked, 2, results["runs"],
                                       args.shard_size, rows, "e2e")  # fmt: skip
                save()
            if args.memory_urls:
                big = write_urls(work / "urls-big.parquet", base, args.memory_urls, args.unique)
                large = run_dinoforge(big, work / "dinoforge-large", None, args.shard_size)
                results["memory"] = large | {
                    "urls": args.memory_urls,
                    "images_per_s": large["successes"] / large["wall_s"],
                }
                rows.write({"kind": "memory", "condition": "close", **results["memory"]})
                save()
        finally:
            server.kill()
            server.wait()
    results["load_after"] = os.getloadavg()
    save()
    summary = {k: results[k] for k in ("close", "keepalive", "e2e", "memory") if k in results}
    print(json.dumps(summary, indent=2, default=str))
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
