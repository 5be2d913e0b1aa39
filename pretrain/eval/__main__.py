"""CLI: python -m pretrain.eval {knn,linear} --checkpoint TRAIN --train DATA_A --val DATA_B"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from pretrain.configtools import atomic_write_text
from pretrain.eval.features import backbone_for_eval, extract_features
from pretrain.eval.knn import knn_accuracy
from pretrain.eval.labelled import labels_in, load_labelled
from pretrain.eval.linear import linear_probe
from pretrain.eval.shutdown import leave, release


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.eval", description=__doc__)
    parser.add_argument("protocol", choices=["knn", "linear"])
    parser.add_argument("--checkpoint", help="training output dir, or a .safetensors/.pth backbone")
    parser.add_argument("--random-init", action="store_true", help="random weights (a baseline)")
    parser.add_argument("--model", default="vit_test", help="architecture for --random-init")
    parser.add_argument("--train", required=True, help="image folder or labelled shards")
    parser.add_argument("--val", required=True, help="image folder or labelled shards")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="default: a run's global crop size; 224 for a weights file",
    )
    parser.add_argument("--ks", default="10,20,100,200")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--n-last-blocks", type=int, default=1, help="linear: CLS of last n blocks")
    parser.add_argument("--avgpool", action="store_true", help="linear: add mean patch token")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        default="auto",
        help="where features are computed: auto (CUDA when present), cpu, cuda",
    )
    parser.add_argument("--output", default=None, help="JSON path (default: beside the checkpoint)")
    return parser


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this machine has no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise SystemExit(f"--device {name!r} is not a device: {exc}") from None


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    backbone, size = backbone_for_eval(
        args.checkpoint, random_init=args.random_init, model=args.model, seed=args.seed
    )
    size = args.image_size or size
    backbone.to(_device(args.device))
    train, val = load_labelled(args.train), load_labelled(args.val)
    feats = (
        {"n_last_blocks": args.n_last_blocks, "avgpool": args.avgpool}
        if args.protocol == "linear"
        else {}
    )
    x_train = extract_features(backbone, train.images, size, **feats)
    x_val = extract_features(backbone, val.images, size, **feats)
    y_train, y_val = torch.tensor(train.labels), torch.tensor(labels_in(val, train))
    if args.protocol == "knn":
        ks = tuple(int(k) for k in args.ks.split(","))
        accs = knn_accuracy(x_train, y_train, x_val, y_val, ks=ks, temperature=args.temperature)
        result = {f"knn_top1_k{k}": acc for k, acc in accs.items()}
    else:
        result = linear_probe(x_train, y_train, x_val, y_val, epochs=args.epochs, seed=args.seed)
    result.update(
        protocol=args.protocol,
        checkpoint=args.checkpoint,
        random_init=args.random_init,
        n_train=len(y_train),
        n_val=len(y_val),
        image_size=size,
    )
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    default_dir = (
        Path(args.checkpoint) if args.checkpoint and Path(args.checkpoint).is_dir() else Path(".")
    )
    out = (
        Path(args.output)
        if args.output
        else default_dir / f"eval_{args.protocol}{'_random' if args.random_init else ''}.json"
    )
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        release()
    # The result is written and what this process started is released: end it here rather than
    # in the interpreter's teardown, which once kept it alive past 60 s (see shutdown.py).
    leave(0)
