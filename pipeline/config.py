"""Config schema of the pipeline's crawl stage (values in configs/pipeline/*.yaml).

Each component receives only its own section: the fetcher and image processor read ``crawl``,
the source readers ``input``, the runner ``ray``, the dedup view ``dedup``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
INPUT_KINDS = ("urls", "folder", "tars")


@dataclass
class InputConfig:
    kind: str = "urls"  # urls | folder | tars
    urls: str = ""  # parquet / csv / jsonl / txt file of URLs (kind=urls)
    url_column: str = "url"
    folder: str = ""  # directory of image files (kind=folder)
    tars: str = ""  # glob of WebDataset tars (kind=tars)
    carry_columns: list[str] | None = None  # None: carry every extra column


@dataclass
class CrawlConfig:
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    shard_size: int = 10000
    allow_private_networks: bool = False
    retry_failed: bool = False
    threads_per_task: int = 16
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 60.0  # whole body download, against servers that drip bytes
    retries: int = 2
    backoff_s: float = 0.5
    max_redirects: int = 5
    max_bytes: int = 20_000_000
    max_pixels: int = 89_478_485  # Pillow's own default bomb limit
    min_size: int = 0  # drop images whose original shorter side is below this
    jpeg_quality: int = 95
    user_agent: str = "dinoforge-crawler/0.1 (+https://github.com/dinoforge)"
    respect_robots_header: bool = True
    robots_opt_outs: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )


@dataclass
class DedupConfig:
    enabled: bool = True
    phash_threshold: int = 4  # max Hamming distance between 64-bit pHashes


@dataclass
class RayConfig:
    address: str = ""  # empty: RAY_ADDRESS or a new local cluster
    num_cpus: int = 0  # local cluster only; 0 = all cores
    cpus_per_task: float = 1.0
    max_tasks_in_flight: int = 0  # 0 = twice the cluster's CPUs


@dataclass
class PipelineConfig:
    output_dir: str = MISSING
    input: InputConfig = field(default_factory=InputConfig)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def check_crawl_config(crawl: CrawlConfig) -> None:
    """Raise ValueError naming the first setting outside its range."""
    if crawl.resize_mode not in RESIZE_MODES:
        raise ValueError(
            f"crawl.resize_mode must be one of {RESIZE_MODES}, got {crawl.resize_mode!r}"
        )
    positive = {
        "crawl.image_size": crawl.image_size,
        "crawl.shard_size": crawl.shard_size,
        "crawl.threads_per_task": crawl.threads_per_task,
        "crawl.max_bytes": crawl.max_bytes,
        "crawl.max_pixels": crawl.max_pixels,
        "crawl.connect_timeout_s": crawl.connect_timeout_s,
        "crawl.read_timeout_s": crawl.read_timeout_s,
        "crawl.total_timeout_s": crawl.total_timeout_s,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if crawl.retries < 0 or crawl.max_redirects < 0 or crawl.min_size < 0:
        raise ValueError("crawl.retries, crawl.max_redirects and crawl.min_size must be >= 0")
    if not 1 <= crawl.jpeg_quality <= 100:
        raise ValueError(f"crawl.jpeg_quality must be in 1..100, got {crawl.jpeg_quality}")
