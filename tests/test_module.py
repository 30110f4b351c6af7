"""The LightningModule's metrics and its checkpoint contents."""

from __future__ import annotations

import torch

from helpers import FEATURE_EXTRACT, build, trainer
from transfer_learning.demo import SHAPES, generate_shapes
from transfer_learning.module import classification_metrics


def test_top5_accuracy_only_with_more_than_five_classes():
    assert set(classification_metrics(5, "val/").keys()) == {"val/acc", "val/f1"}
    assert set(classification_metrics(6, "val/").keys()) == {"val/acc", "val/f1", "val/acc_top5"}


def test_metrics_are_logged_for_validation_and_test(tmp_path):
    root = generate_shapes(tmp_path / "six", images_per_class=6, image_size=32, classes=SHAPES)
    module, datamodule = build(root, FEATURE_EXTRACT, batch_size=8)
    fit = trainer(max_epochs=1)
    fit.fit(module, datamodule)
    assert {"val/acc", "val/f1", "val/acc_top5", "val/acc_best", "val/loss"} <= set(fit.callback_metrics)
    (tested,) = fit.test(module, datamodule, verbose=False)
    assert {"test/acc", "test/f1", "test/acc_top5"} <= set(tested)
    assert 0 <= tested["test/acc"] <= tested["test/acc_top5"] <= 1
    matrix = module.test_confusion_matrix
    assert matrix.shape == (6, 6) and int(matrix.sum()) == len(datamodule.datasets["test"])
    assert torch.equal(matrix.sum(dim=1), torch.bincount(torch.tensor(_labels(datamodule)), minlength=6))


def _labels(datamodule) -> list[int]:
    subset = datamodule.datasets["test"]
    return [subset.dataset.targets[i] for i in subset.indices]
