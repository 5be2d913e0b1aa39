"""Reading and writing backbone weights in the official DINOv2 layout.

The released files (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`) are plain state dicts:
`cls_token` [1, 1, D], `pos_embed` [1, 1 + 37*37, D] (trained at 518 px), `register_tokens`
[1, 4, D] for the _reg4 variants, `mask_token` [1, D], `patch_embed.proj.{weight,bias}`,
per block `blocks.{i}.norm1`, `attn.qkv`, `attn.proj`, `ls1.gamma`, `norm2`,
`mlp.fc1`/`mlp.fc2` (MLP) or `mlp.w12`/`mlp.w3` (fused SwiGLU, ViT-g), `ls2.gamma`, and `norm`.
Our module tree uses exactly these names, so the mapping is the identity; this module adds the
checks (strict keys and shapes with hints), position-grid adoption, and architecture inference.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module.", "backbone.")


class CheckpointKeyError(KeyError):
    """Missing, unexpected or absent keys; prints its message as written (a plain KeyError
    quotes it and escapes the newlines)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _full(tensor: Tensor) -> Tensor:
    # FSDP2 shards parameters as DTensors; a checkpoint file holds whole tensors.
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach()


def dinov2_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The backbone's weights as whole tensors under the official DINOv2 key names (LoRA
    updates, where the model has them, merged into the weights they adapt)."""
    state = {key: _full(value) for key, value in model.state_dict().items()}
    for name, module in model.named_modules():
        if not getattr(module, "lora_rank", 0):
            continue
        for linear in ("qkv", "proj"):
            down = state.pop(f"{name}.{linear}_lora_a")
            up = state.pop(f"{name}.{linear}_lora_b")
            key = f"{name}.{linear}.weight"
            state[key] = module.merged_weight(linear, state[key], down, up)
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Loads a .pth (torch.load with weights_only=True) or .safetensors file of tensors; errors
    name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # refused pickle, not a torch file, corrupt safetensors header
        raise ValueError(
            f"{path} is not a readable weights file (a .pth state dict of tensors, read with "
            f"weights_only=True, or a .safetensors file): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path} does not hold a flat state dict of tensors (a backbone checkpoint)"
        )
    return _strip_wrapper_prefix(dict(state))


def _strip_wrapper_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _mismatch_hints(missing: set[str], unexpected: set[str]) -> list[str]:
    hints = []
    both = missing | unexpected
    if any(".mlp.fc1." in k for k in unexpected) and any(".mlp.w12." in k for k in missing):
        hints.append("the file has an MLP feed-forward: build the backbone with ffn_layer='mlp'")
    if any(".mlp.w12." in k for k in unexpected) and any(".mlp.fc1." in k for k in missing):
        hints.append(
            "the file has a SwiGLU feed-forward: build the backbone with ffn_layer='swiglu'"
        )
    if "register_tokens" in both:
        hints.append("register tokens differ: set num_register_tokens to match the file (0 or 4)")
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in unexpected):
        hints.append("the file stores chunked blocks (blocks.c.i.*): export it with block_chunks=0")
    elif any(k.startswith("blocks.") for k in both) and not hints:
        hints.append("the number of blocks differs: pick the model size that matches the file")
    return hints


def check_dinov2_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Raises KeyError / ValueError unless `state` has exactly the model's keys and shapes
    (pos_embed may hold another position grid of the same width)."""
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        lines = [
            f"checkpoint keys do not match the backbone ({len(missing)} missing, {len(unexpected)} unexpected)"
        ]
        lines += [f"  missing: {k}" for k in sorted(missing)[:8]]
        lines += [f"  unexpected: {k}" for k in sorted(unexpected)[:8]]
        lines += [f"  hint: {h}" for h in _mismatch_hints(missing, unexpected)]
        raise CheckpointKeyError("\n".join(lines))
    wrong = [
        f"  {k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k != "pos_embed" and tuple(state[k].shape) != tuple(v.shape)
    ]
    pos = state["pos_embed"]
    if pos.ndim != 3 or pos.shape[-1] != expected["pos_embed"].shape[-1]:
        wrong.append(
            f"  pos_embed: file {tuple(pos.shape)}, model {tuple(expected['pos_embed'].shape)}"
        )
    elif math.isqrt(pos.shape[1] - 1) ** 2 != pos.shape[1] - 1:
        wrong.append(f"  pos_embed: file {tuple(pos.shape)} is not 1 + a square grid of positions")
    if wrong:
        raise ValueError("checkpoint tensor shapes do not match the backbone:\n" + "\n".join(wrong))


def load_dinov2_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], strict: bool = True
) -> None:
    state = _strip_wrapper_prefix(dict(state))
    if strict:
        check_dinov2_state_dict(model, state)
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        # The file was trained at another resolution (518 px for the official ones): keep its
        # grid; forward() interpolates it to every crop size anyway.
        logger.info(
            "adopting the checkpoint's position grid %s (was %s)",
            tuple(pos.shape),
            tuple(model.pos_embed.shape),
        )
        model.pos_embed = nn.Parameter(
            torch.empty(pos.shape, dtype=model.pos_embed.dtype, device=model.pos_embed.device)
        )
    result = model.load_state_dict(state, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        logger.warning(
            "non-strict load: missing %s, unexpected %s",
            result.missing_keys,
            result.unexpected_keys,
        )


def load_dinov2_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    load_dinov2_state_dict(model, read_state_dict(path), strict=strict)


def save_dinov2_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the backbone in the official layout (.pth, or .safetensors by suffix), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in dinov2_state_dict(model).items()}
    from pretrain.configtools import AtomicFile

    with AtomicFile(path) as tmp:  # fsynced, renamed into place, the umask's mode
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            # num_heads is not in the tensors' shapes: recorded so that a custom size (an
            # arch with model.embed_dim/depth/num_heads overrides) loads back as it trained.
            save_file(state, str(tmp), metadata={"num_heads": str(model.num_heads)})
        else:
            torch.save(state, tmp)


def read_num_heads(path: str | os.PathLike) -> int | None:
    """The head count a dinoforge .safetensors export records in its metadata, or None."""
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get("num_heads")
    except Exception:  # noqa: BLE001 - unreadable here: read_state_dict names the problem
        return None
    return int(value) if value and value.isdigit() else None


def dinov2_arch_from_state_dict(state: Mapping[str, Tensor], num_heads: int | None = None) -> dict:
    """build_backbone keyword arguments that fit a DINOv2-layout state dict (every official size
    has 64-dim heads). A size no arch has needs `num_heads` (from the file's metadata)."""
    from pretrain.models import ARCHS

    state = _strip_wrapper_prefix(dict(state))
    try:
        embed_dim = state["cls_token"].shape[-1]
        patch_size = state["patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    except KeyError as exc:
        raise CheckpointKeyError(
            f"not a DINOv2 ViT backbone state dict: no {exc.args[0]!r} "
            f"(it holds {len(state)} tensors, e.g. {sorted(state)[:3]})"
        ) from exc
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state):
        raise ValueError(
            "the state dict stores chunked blocks (blocks.c.i.*): export it with block_chunks=0"
        )
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointKeyError("not a DINOv2 ViT backbone state dict: no blocks.{i}.* keys")
    depth = 1 + max(blocks)
    names = [n for n, a in ARCHS.items() if a["embed_dim"] == embed_dim and a["depth"] == depth]
    size = {}
    if not names:
        if not num_heads:
            raise ValueError(
                f"no known ViT size has embed_dim {embed_dim} and depth {depth} (a custom size "
                "loads from a dinoforge .safetensors export, which records its head count)"
            )
        names = ["vit_test"]  # any arch: every size setting is overridden
        size = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    return {
        "name": names[0],
        **size,
        "patch_size": patch_size,
        "img_size": grid * patch_size,
        "num_register_tokens": state["register_tokens"].shape[1]
        if "register_tokens" in state
        else 0,
        "ffn_layer": "swiglu" if "blocks.0.mlp.w12.weight" in state else "mlp",
        "layerscale_init": 1e-5 if "blocks.0.ls1.gamma" in state else None,
    }
