"""The LightningModule's metrics and its checkpoint contents."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from helpers import build, trainer
from transfer_learning.data.demo import SHAPES, generate_shapes
from transfer_learning.model.metrics import classification_metrics


def test_top5_accuracy_only_with_more_than_five_classes():
    assert set(classification_metrics(5, "val/").keys()) == {"val/acc", "val/f1"}
    assert set(classification_metrics(6, "val/").keys()) == {"val/acc", "val/f1", "val/acc_top5"}


def test_metrics_are_logged_for_validation_and_test(tmp_path):
    root = generate_shapes(tmp_path / "six", images_per_class=6, image_size=32, classes=SHAPES)
    module, datamodule = build(root, "strategy=feature_extract", batch_size=8)
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
    return datamodule.datasets["test"].labels.tolist()  # cached features (the default)


def test_each_metric_computes_from_its_own_state_even_when_the_first_batch_is_all_correct():
    """torchmetrics merges metrics whose states are equal after the first update into one
    compute group; with an all-correct first batch F1 then reported top-5 accuracy."""
    torch.manual_seed(0)
    n = 10
    collection = classification_metrics(n, "test/")
    separate = {
        "test/acc": MulticlassAccuracy(n, average="micro"),
        "test/f1": MulticlassF1Score(n, average="macro"),
        "test/acc_top5": MulticlassAccuracy(n, top_k=5, average="micro"),
    }
    first_labels = torch.arange(n)
    batches = [(torch.nn.functional.one_hot(first_labels, n).float() * 5, first_labels)]
    batches += [(torch.randn(16, n), torch.randint(0, n, (16,))) for _ in range(6)]
    for logits, labels in batches:
        collection.update(logits, labels)
        for metric in separate.values():
            metric.update(logits, labels)
    computed = collection.compute()
    expected = {name: metric.compute() for name, metric in separate.items()}
    assert set(computed) == set(expected)
    for name in expected:
        assert torch.allclose(computed[name], expected[name]), name
    # The numbers differ from each other: a merged group would make two of them equal.
    assert len({round(float(v), 6) for v in computed.values()}) == 3


def test_random_frozen_backbone_is_announced_loudly(shapes_dir, caplog):
    module, datamodule = build(shapes_dir, "strategy=feature_extract", "model.weights=null")
    assert not module.net.pretrained and module.net.backbone_frozen
    with caplog.at_level("WARNING", logger="transfer_learning.model.module"):
        trainer(max_steps=1).fit(module, datamodule)
    assert any("frozen backbone is RANDOM" in r.getMessage() for r in caplog.records)

    caplog.clear()
    module, datamodule = build(shapes_dir, "strategy=feature_extract")
    with caplog.at_level("WARNING", logger="transfer_learning.model.module"):
        trainer(max_steps=1).fit(module, datamodule)
    assert module.net.pretrained and not any("RANDOM" in r.getMessage() for r in caplog.records)
