"""k-NN and linear probe: golden values on hand-made features, and the CLI on real data."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.data.synthetic import write_shapes_folders, write_shapes_shards
from pretrain.eval import knn_accuracy, linear_probe, load_labelled
from pretrain.eval.__main__ import main as eval_main


def test_knn_weighted_votes_golden():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    val = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.5]])
    truth = torch.tensor([0, 1, 0])
    # Third point: cosines 0.996 (class 1), 0.834 and 0.768 (class 0), 0.721 and 0.640 (class 1).
    acc = knn_accuracy(train, labels, val, truth, ks=(1, 3, 10), temperature=1.0)
    # k=1: its nearest neighbour is class 1. k=3: e^.834 + e^.768 > e^.996, class 0 wins.
    # k=10 (capped at 5): class 1's three votes outweigh again.
    assert acc == pytest.approx({1: 2 / 3, 3: 1.0, 10: 2 / 3})
    # A sharp temperature lets the single nearest neighbour decide at k=3 too.
    sharp = knn_accuracy(train, labels, val, truth, ks=(3,), temperature=0.07)
    assert sharp[3] == pytest.approx(2 / 3)


def test_linear_probe_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=gen) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=gen)
    result = linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=10)
    assert result["accuracy"] > 0.95
    noise = linear_probe(torch.randn(200, 16), y[:200], torch.randn(100, 16), y[200:], epochs=10)
    assert noise["accuracy"] < 0.6


def test_labelled_folders_and_shards(tmp_path):
    write_shapes_folders(tmp_path / "folders", 12, seed=1)
    write_shapes_shards(tmp_path / "shards", 12, per_shard=6, seed=1)
    a, b = load_labelled(str(tmp_path / "folders")), load_labelled(str(tmp_path / "shards"))
    assert len(a.images) == len(b.images) == 12
    assert a.classes == ["circle", "cross", "square", "triangle"] and b.classes == [
        "0",
        "1",
        "2",
        "3",
    ]
    assert sorted(a.labels) == sorted(b.labels)


def test_cli_knn_and_linear_write_json(tmp_path, capsys):
    write_shapes_folders(tmp_path / "a", 40, seed=1)
    write_shapes_shards(tmp_path / "b", 20, per_shard=10, seed=2)
    out = tmp_path / "knn.json"
    args = ["--random-init", "--model", "vit_test", "--image-size", "56",
            "--train", str(tmp_path / "a"), "--val", str(tmp_path / "b")]  # fmt: skip
    result = eval_main(["knn", *args, "--output", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved) >= {"knn_top1_k10", "knn_top1_k20", "knn_top1_k100", "knn_top1_k200"}
    assert saved["n_train"] == 40 and saved["n_val"] == 20 and saved == result
    assert "knn_top1_k20" in capsys.readouterr().out
    lin = eval_main(["linear", *args, "--epochs", "2", "--output", str(tmp_path / "lin.json")])
    assert 0.0 <= lin["accuracy"] <= 1.0 and (tmp_path / "lin.json").is_file()
