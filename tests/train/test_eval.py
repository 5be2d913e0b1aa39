"""k-NN and linear probe: golden values on hand-made features, the CLI on real data, and the
backbone that eval loads from a run (its export, or its latest checkpoint) or a weights file."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.arch import build_student_teacher
from pretrain.checkpoint import save_checkpoint
from pretrain.config import load_train_config
from pretrain.configtools import save_config
from pretrain.data.synthetic import write_shapes_folders, write_shapes_shards
from pretrain.eval import backbone_for_eval, knn_accuracy, linear_probe, load_labelled
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
    # one labelling for both sets: a folder names classes, these shards number them (a folder
    # against such shards is refused: tested below)
    write_shapes_shards(tmp_path / "a", 40, per_shard=20, seed=1)
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


def test_val_labels_follow_train_class_names_when_a_class_is_missing(tmp_path):
    """Each set numbers its own classes: val without train's first class must still label its
    images by name in train's numbering (else every label shifts by one)."""
    from PIL import Image

    from pretrain.eval.labelled import labels_in

    colours = {"apple": (200, 30, 30), "bird": (30, 200, 30), "cloud": (30, 30, 200)}
    for split, names in (("train", colours), ("val", ("bird", "cloud"))):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), colours[name]).save(tmp_path / split / name / f"{i}.png")
    train, val = load_labelled(str(tmp_path / "train")), load_labelled(str(tmp_path / "val"))
    assert val.labels == [0, 0, 1, 1]  # val's own numbering
    assert labels_in(val, train) == [1, 1, 2, 2]  # bird and cloud in train's
    (tmp_path / "val" / "dragon").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "dragon" / "0.png")
    with pytest.raises(ValueError, match="val has classes that train lacks: \\['dragon'\\]"):
        labels_in(load_labelled(str(tmp_path / "val")), train)
    # shards that number their classes (json label 0..3) against a folder that names them
    shards = load_labelled(write_shapes_shards(tmp_path / "s", 8, per_shard=8)[0])
    with pytest.raises(ValueError, match="val has classes that train lacks"):
        labels_in(shards, load_labelled(str(write_shapes_folders(tmp_path / "f", 8))))


def _run_dir(tmp_path, *overrides: str):
    """A training output dir as the job leaves it: its resolved config.yaml (56 px crops)."""
    run = tmp_path / "run"
    cfg = load_train_config(
        "configs/pretrain/vit_test_cpu.yaml", ["data.shards=x", f"output_dir={run}", *overrides]
    )
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    return run, cfg


def test_eval_loads_a_run_through_load_backbone(tmp_path):
    run, cfg = _run_dir(tmp_path, "model.num_register_tokens=4")
    torch.manual_seed(0)
    _, teacher = build_student_teacher(cfg)
    with pytest.raises(FileNotFoundError, match="python -m pretrain.export --checkpoint"):
        backbone_for_eval(str(run))  # neither an export nor a checkpoint
    teacher.backbone.save_dinov2_checkpoint(run / "teacher_backbone.safetensors")
    backbone, size = backbone_for_eval(str(run))
    assert size == 56 and not backbone.training and backbone.num_register_tokens == 4
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), teacher.backbone.eval()(images))
    # a weights file: DINOv2's evaluation size, 224 px, whatever grid it was trained on
    file_backbone, file_size = backbone_for_eval(str(run / "teacher_backbone.safetensors"))
    assert file_size == 224 and file_backbone.pos_embed.shape == backbone.pos_embed.shape
    # the baseline: the run's geometry, random weights
    random, random_size = backbone_for_eval(str(run), random_init=True)
    assert random_size == 56 and random.num_register_tokens == 4
    assert random.pos_embed.shape == backbone.pos_embed.shape
    assert not torch.equal(random.cls_token, backbone.cls_token)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_eval_falls_back_to_the_latest_checkpoint_of_an_unexported_run(tmp_path):
    run, cfg = _run_dir(tmp_path)
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    with torch.no_grad():
        teacher.backbone.cls_token.fill_(0.5)  # a teacher that is not the initial one
    save_checkpoint(
        run / "checkpoints", 3, student=student, teacher=teacher,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1), losses=torch.nn.Module(),
        meta={}, keep_last=1,
    )  # fmt: skip
    backbone, size = backbone_for_eval(str(run))
    assert size == 56 and not backbone.training
    for key, value in teacher.backbone.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[key], value, rtol=0, atol=0)


def test_eval_device_choice():
    import torch

    from pretrain.eval.__main__ import _device

    assert _device("cpu") == torch.device("cpu")
    assert _device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SystemExit, match="not a device"):
        _device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            _device("cuda")
