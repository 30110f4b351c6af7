"""What differs between the two tasks: the loss, the outputs, the metrics and the decisions.

``multiclass``: one label per image; softmax, cross-entropy, accuracy (the best-checkpoint
monitor ``val/acc``), macro F1, top-5 accuracy and the test confusion matrix.
``multilabel``: any number of labels per image; one sigmoid per class, binary cross-entropy,
macro mAP (the monitor ``val/map``), and macro F1, micro F1 and exact-match accuracy at
per-class thresholds chosen on the validation split (F1-maximising per class, chosen again
at every validation, kept in the checkpoint); per-class AP, precision, recall, F1 and support
and precision-recall curves after testing.

The LightningModule asks its :class:`TaskMetrics` and never branches on the task itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from transfer_learning.errors import ConfigError
from transfer_learning.model.metrics import (
    DEFAULT_THRESHOLD,
    Gathered,
    choose_thresholds,
    classification_metrics,
    multilabel_per_class,
    multilabel_scores,
    pr_curves,
)

TASKS = ("multiclass", "multilabel")


def check_task(task: Any) -> str:
    if task not in TASKS:
        raise ConfigError(
            f"task={task!r}: use task=multiclass (one label per image) or task=multilabel (any number "
            "of labels per image), or task=null to take the data source's."
        )
    return str(task)


class ClassificationLoss(nn.Module):
    """Cross-entropy over the classes (multiclass), or binary cross-entropy with logits per class,
    averaged over samples and classes (multilabel). ``weight``: per-class weights (multiclass) or
    ``pos_weight`` (multilabel), from ``data.balance=weighted_loss``; not saved with the model
    (a non-persistent buffer: checkpoints stay loadable without the data).

    Label smoothing in the multi-label case moves every 0/1 target towards 0.5:
    ``y * (1 - s) + 0.5 * s``, each class being its own two-way choice (the multiclass loss moves
    the one-hot target towards the uniform distribution over all classes)."""

    weight: torch.Tensor | None

    def __init__(
        self, multilabel: bool, label_smoothing: float = 0.0, weight: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"label_smoothing={label_smoothing}: a fraction in [0, 1).")
        self.multilabel = multilabel
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.multilabel:
            return F.cross_entropy(logits, target, weight=self.weight, label_smoothing=self.label_smoothing)
        soft = target.to(logits.dtype)
        if self.label_smoothing:
            soft = soft * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(logits, soft, pos_weight=self.weight)


class TaskMetrics(nn.Module):
    """The metrics of one task for training, validation and test (``stage``: "val" | "test")."""

    multilabel: bool
    monitor: str  # the validation metric that picks the best checkpoint
    #: Multi-label: each class's decision threshold, chosen at each validation; None until then.
    #: In the space of :meth:`probabilities` (calibrated ones once a temperature is set).
    thresholds: torch.Tensor | None = None
    #: Temperature scaling (:mod:`transfer_learning.model.calibration`): logits are divided by it
    #: before the softmax / sigmoid. 1.0 until a run is calibrated after fitting.
    temperature: float = 1.0

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of ``logits``, calibrated by :attr:`temperature`."""
        return self.activation(logits.float() / self.temperature)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax (multiclass) or sigmoid (multilabel) of ``logits`` as they are: no temperature."""
        raise NotImplementedError

    def set_temperature(self, temperature: float) -> None:
        """Calibrate the probabilities with ``temperature``; multi-label thresholds move with
        them so that every decision stays the same (a class called at sigmoid(z / T0) >= t is
        called at sigmoid(z / T) >= sigmoid(logit(t) * T0 / T))."""
        if not (temperature > 0 and torch.isfinite(torch.tensor(temperature))):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if self.thresholds is not None:
            t = self.thresholds.double().clamp(1e-12, 1 - 1e-12)
            self.thresholds = (torch.logit(t) * self.temperature / temperature).sigmoid().float()
        self.temperature = float(temperature)

    def decide(self, probs: torch.Tensor) -> list[list[int]]:
        """The predicted class indices of each row of ``probs``."""
        raise NotImplementedError

    def train_metrics(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, Metric]:
        """Updated with a training batch; logged per epoch."""
        return {}

    def update(self, stage: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The epoch's logged values (reduced over processes) and, after testing, the results
        that are not single numbers; resets the states."""
        raise NotImplementedError


class MulticlassMetrics(TaskMetrics):
    multilabel = False
    monitor = "val/acc"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val = classification_metrics(num_classes, "val/")
        self.test = classification_metrics(num_classes, "test/")
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1)

    def decide(self, probs: torch.Tensor) -> list[list[int]]:
        return [[int(i)] for i in probs.argmax(-1)]

    def train_metrics(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, Metric]:
        self.train_acc(logits, target)
        return {"train/acc": self.train_acc}

    def update(self, stage: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        if stage == "val":
            self.val.update(logits, target)
            return
        self.test.update(logits, target)
        self.confusion.update(logits, target)

    def finish(self, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        collection = self.val if stage == "val" else self.test
        values = collection.compute()
        collection.reset()
        if stage != "test":
            return values, {}
        matrix = self.confusion.compute().cpu()  # every process takes part in the reduction
        self.confusion.reset()
        return values, {"confusion_matrix": matrix}


class MultilabelMetrics(TaskMetrics):
    multilabel = True
    monitor = "val/map"

    def __init__(self, class_names: Sequence[str]) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.gathered = nn.ModuleDict({"val": Gathered(len(class_names)), "test": Gathered(len(class_names))})

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def _thresholds(self, like: torch.Tensor) -> torch.Tensor:
        if self.thresholds is None:
            return torch.full((like.shape[-1],), DEFAULT_THRESHOLD, device=like.device)
        return self.thresholds.to(like.device)

    def _gathered(self, stage: str) -> Gathered:
        gathered = self.gathered[stage]
        assert isinstance(gathered, Gathered)
        return gathered

    def decide(self, probs: torch.Tensor) -> list[list[int]]:
        called = probs >= self._thresholds(probs)
        return [row.nonzero().flatten().tolist() for row in called]

    def update(self, stage: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        self._gathered(stage).update(self.probabilities(logits), target)

    def finish(self, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        gathered = self._gathered(stage)
        probs, targets = gathered.compute()  # every sample of every process
        gathered.reset()
        if stage == "val" and len(probs):
            self.thresholds = choose_thresholds(probs, targets).cpu()
        thresholds = self._thresholds(probs)
        scores = multilabel_scores(probs, targets, thresholds)
        values = {f"{stage}/{name}": torch.tensor(value) for name, value in scores.items()}
        if stage != "test":
            return values, {}
        results = {
            "per_class": multilabel_per_class(probs.cpu(), targets.cpu(), thresholds.cpu(), self.class_names),
            "pr_curves": pr_curves(probs.cpu(), targets.cpu(), self.class_names),
        }
        return values, results


def task_metrics(task: str, class_names: Sequence[str]) -> TaskMetrics:
    return MultilabelMetrics(class_names) if task == "multilabel" else MulticlassMetrics(len(class_names))
