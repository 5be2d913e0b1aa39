"""The training config schema: one dataclass per component, values from configs/pretrain/*.yaml.

    cfg = load_train_config("configs/pretrain/vit_test_cpu.yaml", ["train.steps=10"])

Defaults are DINOv2's ViT-S/B recipe (Oquab et al., "DINOv2", arXiv:2304.07193, and the
released facebookresearch/dinov2 `dinov2/configs/ssl_default_config.yaml`); the YAML files
hold the differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pretrain.configtools import ConfigError, load_config


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_test | vit_small | vit_base | vit_large | vit_giant2
    patch_size: int = 14
    num_register_tokens: int = 0
    drop_path_rate: float = 0.3
    layerscale_init: float = 1e-5
    ffn_layer: str | None = None
    attn_backend: str = "auto"
    # Width, depth and heads of the arch, overridden when > 0: for a custom size, or a thin
    # copy of a recipe that keeps every other setting (the recipe tests use one).
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    # Start from released weights: an official DINOv2 .pth, a .safetensors in that layout, or a
    # dinoforge run directory (its teacher, heads included). Empty: random init. Read once at
    # the start of a fresh run (a resume takes its checkpoint); docs/training.md, "Continued
    # pretraining".
    pretrained: str = ""
    # Only the last N blocks and the final norm train (-1: every block). Fewer trainable
    # weights keep more of a loaded backbone's features and cost less optimizer memory.
    trainable_blocks: int = -1
    # LoRA on every block's attention qkv and proj (0: off): the backbone's own weights then
    # stay frozen (but the last `trainable_blocks`), low-rank updates of rank r train, scaled
    # alpha / r, and are merged into plain weights at export.
    lora_rank: int = 0
    lora_alpha: float = 16.0


@dataclass
class HeadConfig:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    # iBOT shares the DINO head unless this is set (ViT-g uses a separate one).
    separate_ibot_head: bool = False
    ibot_out_dim: int = 65536


@dataclass
class DataConfig:
    # A glob, a list of paths, a text file listing shards, or a pipeline run directory.
    shards: Any = None
    batch_size_per_rank: int = 64
    num_workers: int = 4
    shuffle_buffer: int = 1000
    # Each loader stream restarts its RNG every this many batches: bounds the skip on resume.
    reseed_every: int = 500
    image_key: str = "jpg;jpeg;png;webp"


@dataclass
class CropsConfig:
    global_crops_size: int = 224
    # 98, not DINOv2's 96: crops must be a whole number of patches, and 96 is not for patch 14
    # (DINOv2's own /14 recipes use 98 too).
    local_crops_size: int = 98
    local_crops_number: int = 8
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    # Intended DINOv2 probabilities: global crop 1, global crop 2, locals.
    blur_probs: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])
    solarize_prob: float = 0.2
    # (brightness, contrast, saturation, hue) strengths, applied with color_jitter_prob.
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    # Where colour jitter, grayscale, blur and solarize run: "loader" (CPU workers, per crop),
    # "device" (batched on the training device; the loader only crops, flips and draws the
    # parameters: several times more images per loader core), or "auto" (device on CUDA,
    # loader otherwise). Either way the loader hands over uint8 crops, normalised on the device.
    photometric: str = "auto"


@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: str = "centering"  # centering | sinkhorn_knopp
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    mask_probability: float = 0.5


@dataclass
class OptimConfig:
    base_lr: float = 0.004  # per 1024 images, scaled by sqrt(global_batch / 1024)
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: float = 1
    clip_grad: float = 3.0
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    scaling_rule: str = "sqrt_wrt_1024"  # sqrt_wrt_1024 | linear_wrt_1024 | none
    # The backbone's lr relative to the heads' (peak x this), and its own linear warm-up over
    # this many steps once it unfreezes (after train.freeze_backbone_steps): a loaded backbone
    # needs a gentler lr than new heads.
    backbone_lr_mult: float = 1.0
    backbone_warmup_steps: int = 0
    # AdamW kernel: "foreach" (multi-tensor, works everywhere) or "fused" (one kernel per
    # parameter group on CUDA; fewer launches, a lever for the optimiser's share of a step).
    implementation: str = "foreach"


@dataclass
class TrainRunConfig:
    steps: int = 125000
    iterations_per_epoch: int = 1250  # DINOv2's "epoch": schedules are written in epochs of this
    checkpoint_every: int = 3750
    seed: int = 0
    log_every: int = 10
    # Stop (after checkpointing) once this step is done, as if preempted; 0 = run to `steps`.
    stop_after: int = 0
    # Steps during which only the heads learn (the backbone's gradients are dropped before the
    # optimizer: no update, no weight decay, no optimizer state). New heads on a loaded
    # backbone give random targets first; letting them settle keeps those from tearing the
    # features apart (the collapse users report when unfreezing at once).
    freeze_backbone_steps: int = 0


@dataclass
class DistConfig:
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    mixed_precision: str = "auto"  # auto: bf16 params + fp32 reduce on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile per block
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True  # the student's; the teacher always reshards (no backward)


@dataclass
class DistillConfig:
    # A frozen teacher to distill into this config's model (another size, the same patch):
    # a dinoforge run directory (its teacher and heads: DINOv2-style distillation, the student
    # learns the teacher's DINO/iBOT targets; head.* must match the run's) or a backbone file
    # (official DINOv2 layout: feature distillation, the student's CLS and patch tokens,
    # projected to the teacher's width, learn the teacher's by cosine). Empty: no distillation.
    teacher: str = ""
    mode: str = (
        "auto"  # auto (dino for a run directory with heads, else features) | dino | features
    )


@dataclass
class CheckpointConfig:
    keep_last: int = 3
    # Keys whose change between the saved config and this run is fine when resuming.
    allowed_changes: list[str] = field(
        default_factory=lambda: [
            "train.steps",
            "train.stop_after",
            "train.checkpoint_every",
            "train.log_every",
            "data.shards",
            "data.num_workers",
            "dist.compile",
            "dist.activation_checkpointing",
            "optim.implementation",
            "logging.tensorboard",
            "checkpoint.keep_last",
        ]
    )


@dataclass
class LoggingConfig:
    tensorboard: bool = True


@dataclass
class TrainConfig:
    output_dir: str = "train_run"
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainRunConfig = field(default_factory=TrainRunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def validate(cfg: TrainConfig) -> None:
    """Checks that the schema's types cannot express; raises ConfigError naming the key."""
    if cfg.data.shards in (None, "", []):
        raise ConfigError(
            "data.shards is not set: give a glob, a list, a shard-list file or a run dir"
        )
    checks = [
        (cfg.data.batch_size_per_rank >= 2, "data.batch_size_per_rank must be >= 2 (KoLeo)"),
        (cfg.train.steps > 0, "train.steps must be > 0"),
        (cfg.train.checkpoint_every > 0, "train.checkpoint_every must be > 0"),
        (cfg.train.iterations_per_epoch > 0, "train.iterations_per_epoch must be > 0"),
        (cfg.train.log_every > 0, "train.log_every must be > 0"),
        (cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last must be >= 1"),
        (
            cfg.loss.centering in ("centering", "sinkhorn_knopp"),
            "loss.centering must be 'centering' or 'sinkhorn_knopp'",
        ),
        (
            cfg.optim.scaling_rule in ("sqrt_wrt_1024", "linear_wrt_1024", "none"),
            "optim.scaling_rule must be sqrt_wrt_1024, linear_wrt_1024 or none",
        ),
        (cfg.train.freeze_backbone_steps >= 0, "train.freeze_backbone_steps must be >= 0"),
        (
            cfg.optim.backbone_lr_mult >= 0 and cfg.optim.backbone_warmup_steps >= 0,
            "optim.backbone_lr_mult and optim.backbone_warmup_steps must be >= 0",
        ),
        (
            cfg.model.trainable_blocks >= -1,
            "model.trainable_blocks must be -1 (every block) or the number of last blocks",
        ),
        (
            cfg.model.lora_rank >= 0 and cfg.model.lora_alpha > 0,
            "model.lora_rank must be >= 0 and model.lora_alpha > 0",
        ),
        (
            cfg.distill.mode in ("auto", "dino", "features"),
            "distill.mode must be auto, dino or features",
        ),
        (
            cfg.optim.implementation in ("foreach", "fused"),
            "optim.implementation must be foreach or fused",
        ),
        (
            cfg.crops.photometric in ("auto", "loader", "device"),
            "crops.photometric must be auto, loader or device",
        ),
        (
            min(cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) >= 0,
            "model.embed_dim, model.depth and model.num_heads must be >= 0 (0: the arch's)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_crop_sizes(cfg)


def check_crop_sizes(cfg: TrainConfig) -> None:
    """Every crop the model sees must be a whole number of patches (the patch embedding has no
    padding): one error naming each size that is not, with the nearest sizes that are."""
    patch = cfg.model.patch_size
    if patch <= 0:
        raise ConfigError(f"model.patch_size must be > 0, got {patch}")
    sizes = {"crops.global_crops_size": cfg.crops.global_crops_size}
    if cfg.crops.local_crops_number > 0:
        sizes["crops.local_crops_size"] = cfg.crops.local_crops_size
    bad = []
    for key, size in sizes.items():
        if size <= 0 or size % patch:
            below, above = max(patch, size - size % patch), size - size % patch + patch
            bad.append(f"{key}={size} (try {below} or {above})")
    if bad:
        raise ConfigError(
            f"crop sizes must be multiples of model.patch_size={patch}: {', '.join(bad)}"
        )


def load_train_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    cfg = load_config(TrainConfig, path, overrides)
    validate(cfg)
    return cfg
