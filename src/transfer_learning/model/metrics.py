"""Metrics of both tasks.

Single-label: torchmetrics' accuracy and macro F1, whose sums reduce exactly over processes.
Multi-label: average precision and thresholds need whole rankings, not sums, so every sample's
probabilities are gathered from every process (:class:`Gathered`) and the numbers are computed
here from them, the way scikit-learn defines them (``average_precision_score``, ``f1_score``;
tests/test_multilabel.py compares them). Every process computes the same numbers from the same
gathered tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.utilities import dim_zero_cat

# A class without a single positive validation example keeps this threshold (nothing to choose on).
DEFAULT_THRESHOLD = 0.5
# Precision-recall curves longer than this are thinned (evenly, ends kept): they are for pictures.
MAX_CURVE_POINTS = 1000


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Single-label: accuracy, macro F1 and (above five classes) top-5 accuracy, each from its
    own state.

    ``compute_groups=False``: torchmetrics would otherwise merge metrics whose states happen to
    be equal after the first batch (F1 and top-5 accuracy when that batch is all correct) and
    report one metric's value under the other's name for the rest of the run.
    """
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


class Gathered(Metric):
    """Every sample's class probabilities and 0/1 targets, from every process (each sample once:
    the evaluation loaders shard without padding). Rows are kept flat, so that a process that
    saw no sample takes part in the gathering with an empty tensor."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        self.probs.append(probs.detach().float().flatten())  # type: ignore[union-attr, operator]
        self.targets.append(targets.detach().float().flatten())  # type: ignore[union-attr, operator]

    def _rows(self, state: Any) -> torch.Tensor:
        if isinstance(state, list) and not state:
            return torch.zeros(0, self.num_classes, device=self.device)
        return dim_zero_cat(state).reshape(-1, self.num_classes)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, targets)``, each of shape (N, C)."""
        return self._rows(self.probs), self._rows(self.targets)


def _ranked(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct scores, highest first, and the true and false positives counted when every
    sample scoring at least that much is called positive (ties fall together, as in sklearn)."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranked, hits = scores[order], positive[order].double()
    tp, fp = torch.cumsum(hits, 0), torch.cumsum(1 - hits, 0)
    last = torch.ones_like(ranked, dtype=torch.bool)
    last[:-1] = ranked[1:] != ranked[:-1]
    return ranked[last], tp[last], fp[last]


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """sklearn's ``average_precision_score`` of one class: sum over the distinct thresholds of
    (recall gained) x precision. None for a class without positives (it has no ranking to judge)."""
    total = float(positive.sum())
    if total == 0:
        return None
    _, tp, fp = _ranked(scores, positive)
    precision, recall = tp / (tp + fp), tp / total
    gained = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((gained * precision).sum())


def choose_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per class, the threshold that maximises F1 on these (validation) samples: a sample is
    called positive when its probability is at least the threshold. It sits halfway between the
    lowest score called positive and the next lower score, the margin either side being
    equal; ties go to the higher threshold (fewer calls). A class without positives keeps
    ``DEFAULT_THRESHOLD``. Returns a (C,) tensor of ``probs``' dtype."""
    out = torch.full((probs.shape[1],), DEFAULT_THRESHOLD, dtype=probs.dtype, device=probs.device)
    for c in range(probs.shape[1]):
        scores, tp, fp = _ranked(probs[:, c], targets[:, c])
        total = tp[-1] if len(tp) else tp.new_zeros(())
        if total == 0:
            continue
        best = int(torch.argmax(2 * tp / (tp + fp + total)))
        threshold = scores[best]
        if best + 1 < len(scores):
            middle = (scores[best] + scores[best + 1]) / 2
            if middle > scores[best + 1]:  # not rounded down onto the lower score
                threshold = middle
        out[c] = threshold
    return out


def _counts(
    probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class: true positives, false positives, false negatives (float64), and the calls."""
    called = probs >= thresholds.to(probs)
    truth = targets > 0.5
    tp = (called & truth).sum(0).double()
    fp = (called & ~truth).sum(0).double()
    fn = (~called & truth).sum(0).double()
    return tp, fp, fn, called


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0 (sklearn's ``zero_division`` default)."""
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def mean_average_precision(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Macro mAP over the classes that have positives among these samples (NaN if none has)."""
    values = [average_precision(probs[:, c], targets[:, c]) for c in range(probs.shape[1])]
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else float("nan")


def multilabel_scores(
    probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor
) -> dict[str, float]:
    """``map`` (macro mean average precision, threshold-free), ``f1`` (macro) and ``f1_micro`` at
    the per-class ``thresholds``, and ``exact_match`` (the share of samples whose whole label set
    is right). probs and targets: (N, C)."""
    tp, fp, fn, called = _counts(probs, targets, thresholds)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    micro = _ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    exact = (called == (targets > 0.5)).all(1).double().mean() if len(probs) else torch.tensor(float("nan"))
    return {
        "map": mean_average_precision(probs, targets),
        "f1": float(f1.mean()),
        "f1_micro": float(micro),
        "exact_match": float(exact),
    }


def multilabel_per_class(
    probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per class: ``class``, ``ap`` (None without positives), ``precision``, ``recall``
    and ``f1`` at the class's threshold, ``support`` (positives) and ``threshold``."""
    tp, fp, fn, _ = _counts(probs, targets, thresholds)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return [
        {
            "class": name,
            "ap": average_precision(probs[:, c], targets[:, c]),
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(tp[c] + fn[c]),
            "threshold": float(thresholds[c]),
        }
        for c, name in enumerate(class_names)
    ]


def _thin(values: list[float], keep: Sequence[int]) -> list[float]:
    return [values[i] for i in keep]


def pr_curves(
    probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str], max_points: int = MAX_CURVE_POINTS
) -> dict[str, tuple[list[float], list[float]]]:
    """Per class, the precision-recall curve as ``(precision, recall)``, from (1, 0) through every
    distinct threshold, highest first (sklearn's ``precision_recall_curve`` read backwards);
    thinned to ``max_points``. Empty lists for a class without positives."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for c, name in enumerate(class_names):
        total = float(targets[:, c].sum())
        if total == 0:
            curves[name] = ([], [])
            continue
        _, tp, fp = _ranked(probs[:, c], targets[:, c])
        precision = [1.0, *(tp / (tp + fp)).tolist()]
        recall = [0.0, *(tp / total).tolist()]
        if len(precision) > max_points:
            keep = sorted({round(i * (len(precision) - 1) / (max_points - 1)) for i in range(max_points)})
            precision, recall = _thin(precision, keep), _thin(recall, keep)
        curves[name] = (precision, recall)
    return curves
