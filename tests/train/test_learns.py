"""It learns: on generated shapes (class = shape; colour, size, position vary), the k-NN accuracy
of the pretrained teacher must beat the same architecture at random init by a clear margin.

Marked slow and not yet passing: in the short CPU runs tried so far (100-300 steps, batch 16)
the DINO loss collapses to exactly log(K) (the teacher head maps every image to one bottleneck
direction, so its centred targets are uniform) and the teacher's k-NN stays at chance; the
measured runs and the diagnosis are in docs/training.md ("Known limits").
"""

from __future__ import annotations

import pytest

from pretrain.data.synthetic import write_shapes_folders, write_shapes_shards
from pretrain.eval.__main__ import main as eval_main

MARGIN = 0.10


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_pretrained_teacher_beats_random_init(helpers, tmp_path):
    write_shapes_shards(tmp_path / "shards", 2048, per_shard=256, seed=1)
    write_shapes_folders(tmp_path / "train", 400, seed=2)
    write_shapes_folders(tmp_path / "val", 200, seed=3)
    out = tmp_path / "run"
    proc = helpers.run_train(2, [
        f"data.shards={tmp_path / 'shards'}", f"output_dir={out}", "train.steps=1500",
        "train.log_every=100", "train.checkpoint_every=1500", "data.batch_size_per_rank=32",
        "model.layerscale_init=1.0", "optim.base_lr=0.002", "optim.momentum_teacher=0.99",
        "loss.centering=sinkhorn_knopp", "crops.global_crops_scale=[0.6,1.0]",
        "logging.tensorboard=false",
    ], timeout=3300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = ["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val")]
    trained = eval_main(
        ["knn", "--checkpoint", str(out), *data, "--output", str(tmp_path / "t.json")]
    )
    random = eval_main(["knn", "--random-init", "--checkpoint", str(out), *data,
                        "--output", str(tmp_path / "r.json")])  # fmt: skip
    assert trained["knn_top1_k20"] >= random["knn_top1_k20"] + MARGIN, (trained, random)
