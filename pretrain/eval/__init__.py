"""Evaluation of a pretrained backbone on labelled data: k-NN and linear probe.

python -m pretrain.eval knn --checkpoint TRAIN --train DATA_A --val DATA_B
python -m pretrain.eval linear --checkpoint TRAIN --train DATA_A --val DATA_B
python -m pretrain.eval knn --random-init --model vit_test --train DATA_A --val DATA_B
"""

from pretrain.eval.features import backbone_for_eval, extract_features
from pretrain.eval.knn import knn_accuracy
from pretrain.eval.labelled import load_labelled
from pretrain.eval.linear import linear_probe

__all__ = ["extract_features", "knn_accuracy", "linear_probe", "backbone_for_eval", "load_labelled"]
