"""Config schema of the pipeline (values in configs/pipeline/*.yaml).

Each component receives only its own section: the fetcher and image processor read ``crawl``,
the source readers ``input``, the runner ``ray``, the dedup view ``dedup``, the embedder
``embed``, semantic dedup ``semdedup`` and ``decontaminate``.
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
    # Threads per shard task: they mostly wait on the network. One task's CPU part is bound by
    # its GIL to about one core (~250 images/s at 256 px), so 64 covers ~250 ms per URL; raise
    # it for slower hosts (see docs/pipeline.md, "Sizing a crawl").
    threads_per_task: int = 64
    # Of those threads, how many may decode / resize / encode / hash at once. The rest wait on
    # the network; a few CPU slots keep a task's cores busy without dozens of threads contending
    # for its GIL.
    cpu_slots_per_task: int = 2
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 60.0  # whole body download, against servers that drip bytes
    # Retries (exponential backoff) of connection errors and 5xx. A timed-out URL is not
    # retried unless retry_timeouts: a host that hung for read_timeout_s seldom answers a second
    # time, and each retry would hold a thread for the whole timeout again.
    retries: int = 2
    retry_timeouts: bool = False
    backoff_s: float = 0.5
    max_redirects: int = 5
    dns_cache_ttl_s: float = 300.0  # answers and failures cached per task for this long
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
    phash_threshold: int = 4  # max Hamming distance between 64-bit pHashes


@dataclass
class EmbedConfig:
    checkpoint: str = ""  # official DINOv2 .pth / DINOv2-layout .safetensors / dinoforge train dir
    image_size: int = 224  # centre crop after resizing the short side to image_size / 0.875
    features: str = "cls"  # cls | cls_patch_mean (CLS concatenated with the mean patch token)
    # Per embedding actor; 0: by where its model runs (pipeline/resources.py). On a CPU 64 and
    # 4, as always. On a GPU 256 at 224 px (the same pixels per batch at other sizes) and one
    # decode thread per CPU of the actor: decoding, which overlaps the forward, feeds the GPU.
    batch_size: int = 0
    decode_threads: int = 0
    actors: int = 0  # 0: actors_per_gpu per GPU, or one on a CPU-only cluster
    # Actors sharing a GPU (num_gpus = 1 / n each): while one decodes, stacks and copies its
    # batch in, or writes its shard, the other's forward keeps the GPU busy.
    actors_per_gpu: int = 2
    # 0: on GPUs, the GPU nodes' CPUs per GPU split among its actors (the decoders); on a
    # CPU-only cluster half a CPU (never more there: see resources.embed_pool).
    cpus_per_actor: float = 0.0
    torch_threads: int = 0  # 0: torch's default (the actor's share of the machine)
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class SemDedupConfig:
    k: int = 64  # nearest neighbours per image (capped by the pool size)
    threshold: float = 0.9  # cosine similarity above which two images are copies
    index: str = "auto"  # auto | flat | ivf | imi
    ivf_min_size: int = 200_000  # auto: an inverted index (IMI on CPU, IVF on GPU) from here on
    ivf_nlist: int = 0  # 0: about 4 * sqrt(N)
    ivf_nprobe: int = 32  # lists probed per query (IVF and IMI)
    imi_bits: int = 0  # IMI: 4^bits lists; 0: about N / 64
    pq_m: int = 0  # >0: IVF-PQ with this many sub-quantizers (memory at scale)
    query_chunk: int = 65536  # queries per search call / Ray task
    # FAISS on GPUs: the driver's index when its machine has some, and each Ray search task
    # asks for gpus_per_task GPUs when the cluster has them (a share of one is fine; several
    # hold the index sharded or replicated).
    use_gpu: bool = True
    gpus_per_task: float = 1.0
    gpu_float16: bool = False  # GPU copies keep flat vectors / PQ tables in float16 (half memory)
    # Refuse a result where one component holds more than this share of a pool of at least
    # 100 images: the embedder does not tell the images apart (collapsed, untrained, another
    # domain) or the threshold is too low. 1.0 disables the check.
    max_component_share: float = 0.5


@dataclass
class DecontaminateConfig:
    sets: list[str] = field(default_factory=list)  # folders or tar globs of evaluation images
    threshold: float = 0.45  # cosine similarity to an eval image that removes a component


@dataclass
class ClusterConfig:
    # Clusters per level, level 1 (the embeddings) first; strictly decreasing.
    levels: list[int] = field(default_factory=lambda: [1000, 100, 10])
    # Lloyd iterations of every k-means run (the paper: 50; FAISS's default: 25). 20 here:
    # spherical k-means of embeddings is within about 1% of its final objective by then and
    # the cost is linear in it.
    iterations: int = 20
    # Resampling steps per level. Level 1: one step (each costs about half the level's first
    # k-means when the sample rule applies); upper levels cluster centroids, which is cheap:
    # 10 as in the paper.
    resampling_steps: list[int] = field(default_factory=lambda: [1, 10, 10])
    # Points kept per cluster in a resampling step, per level; 0: half the average cluster
    # size of the level's training sample (the paper's rule: 10/5/3 for 20/10/5 on average).
    sample_sizes: list[int] = field(default_factory=lambda: [0, 0, 0])
    init: str = "kmeans++"  # kmeans++ (ours, as in the paper) | faiss (FAISS's random init)
    # Training sample of a level: at most k * this many of its inputs (FAISS's rule).
    max_points_per_centroid: int = 256
    seed: int = 0
    # FAISS k-means and assignment on the GPU(s) when present: the driver's, and each Ray
    # assignment task (one per embedding part, a small centroid index) asks for gpus_per_task.
    use_gpu: bool = True
    gpus_per_task: float = 0.25
    gpu_float16: bool = False  # the centroids in float16 on the GPU (nearest-centroid ties move)
    assign_chunk: int = 65536  # rows per assignment call / Ray task


@dataclass
class CurateConfig:
    # Seed images: "the domain I want more of" (a folder of images or a glob of tars), embedded
    # with the pool's model. Empty: no retrieval, balanced sampling only.
    seeds: str = ""
    mode: str = "auto"  # auto (retrieval when seeds are set, then balanced) | retrieval | balanced
    retrieval: str = "auto"  # auto | sample | cluster: per-seed kNN, or whole level-1 clusters
    cluster_based_below: int = 1000  # auto: cluster-based for seed sets smaller than this
    per_seed: int = 4  # sample-based: nearest pool images per seed image (DINOv2: 4)
    min_seeds_per_cluster: int = 3  # cluster-based: clusters holding more seeds than this
    per_cluster: int = 10000  # cluster-based: images taken from each such cluster
    max_per_seed_set: int = 1_000_000  # cluster-based: cap over the whole seed set
    retrieval_ivf_min_size: int = 1_000_000  # exact search below; above, IMI on CPU, IVF on GPU
    retrieval_pq_m: int = 0  # >0: IVF-PQ codes of this many bytes above that size (memory)
    target_size: int = 0  # balanced sampling fills the selection up to this; 0: retrieval only
    strategy: str = "random"  # random | closest: which images of a level-1 cluster to take
    max_repeat: int = 1  # how often balanced sampling may pick one image
    include_seeds: bool = False  # the seed images themselves join the curated set (on top)
    shard_size: int = 1000  # samples per curated shard
    seed: int = 0
    use_gpu: bool = True  # the retrieval index (built and searched on the driver) on its GPUs
    gpu_float16: bool = False  # its GPU copy in float16 (flat vectors / PQ tables)


@dataclass
class RayConfig:
    address: str = ""  # empty: RAY_ADDRESS or a new local cluster
    num_cpus: int = 0  # local cluster only; 0 = all cores
    cpus_per_task: float = 1.0  # a running crawl task's share; Ray reserves half (its tail)
    max_tasks_in_flight: int = 0  # 0 = twice the cluster's CPUs


@dataclass
class PipelineConfig:
    output_dir: str = MISSING
    # The stages to run, in order (see pipeline/stages): a recipe lists its own; a subset reuses
    # the finished outputs of the stages it leaves out.
    stages: list[str] = field(default_factory=lambda: ["crawl", "dedup"])
    redo: list[str] = field(default_factory=list)  # clear these stages (and all later) first
    input: InputConfig = field(default_factory=InputConfig)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    semdedup: SemDedupConfig = field(default_factory=SemDedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
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
        "crawl.cpu_slots_per_task": crawl.cpu_slots_per_task,
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
    if crawl.dns_cache_ttl_s < 0:
        raise ValueError(f"crawl.dns_cache_ttl_s must be >= 0, got {crawl.dns_cache_ttl_s}")
    if not 1 <= crawl.jpeg_quality <= 100:
        raise ValueError(f"crawl.jpeg_quality must be in 1..100, got {crawl.jpeg_quality}")


def check_dedup_config(dedup: DedupConfig) -> None:
    if not 0 <= dedup.phash_threshold < 64:  # Hamming distance between 64-bit hashes
        raise ValueError(f"dedup.phash_threshold must be in 0..63, got {dedup.phash_threshold}")


def check_ray_config(ray: RayConfig) -> None:
    """Raise ValueError naming the first ray setting outside its range."""
    if ray.cpus_per_task <= 0:
        raise ValueError(f"ray.cpus_per_task must be > 0, got {ray.cpus_per_task}")
    if ray.num_cpus < 0 or ray.max_tasks_in_flight < 0:
        raise ValueError(
            "ray.num_cpus and ray.max_tasks_in_flight must be >= 0 (0: the machine's), got "
            f"{ray.num_cpus} and {ray.max_tasks_in_flight}"
        )


EMBED_FEATURES = ("cls", "cls_patch_mean")
EMBED_DEVICES = ("auto", "cpu", "cuda")


def check_embed_config(embed: EmbedConfig) -> None:
    """Raise ValueError naming the first embed setting outside its range."""
    if not embed.checkpoint:
        raise ValueError(
            "embed.checkpoint is not set: give an official DINOv2 .pth, a DINOv2-layout "
            ".safetensors file, or a dinoforge training output dir"
        )
    if embed.features not in EMBED_FEATURES:
        raise ValueError(f"embed.features must be one of {EMBED_FEATURES}, got {embed.features!r}")
    if embed.device not in EMBED_DEVICES:
        raise ValueError(f"embed.device must be one of {EMBED_DEVICES}, got {embed.device!r}")
    for name in ("image_size", "actors_per_gpu"):
        if getattr(embed, name) <= 0:
            raise ValueError(f"embed.{name} must be > 0, got {getattr(embed, name)}")
    for name in ("batch_size", "decode_threads", "actors", "torch_threads", "cpus_per_actor"):
        if not getattr(embed, name) >= 0:  # NaN fails too
            raise ValueError(f"embed.{name} must be >= 0 (0: auto), got {getattr(embed, name)}")
