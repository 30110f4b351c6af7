"""Results of multi-label runs, where single-label runs show a confusion matrix: the per-class
AP / precision / recall / F1 / support table, the precision-recall curves (one per class, AP in
the legend) and the samples whose predicted label set differs from the true one; and eval.py's measure of a
multi-label checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from transfer_learning.model.metrics import (
    DEFAULT_THRESHOLD,
    multilabel_per_class,
    multilabel_scores,
    pr_curves,
)
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.plotting import pyplot, save_figure
from transfer_learning.results.analysis import write_rows

PER_CLASS_COLUMNS = ("class", "ap", "precision", "recall", "f1", "support", "threshold")


def label_set(indices: Sequence[int], class_names: Sequence[str]) -> str:
    """Class names joined by a space (an empty string for an empty set)."""
    return " ".join(class_names[int(i)] for i in indices)


def multi_hot(targets: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """(N, C) float 0/1 rows from each sample's class indices."""
    out = torch.zeros(len(targets), num_classes)
    for row, indices in enumerate(targets):
        out[row, list(indices)] = 1.0
    return out


def save_pr_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    per_class: Sequence[Mapping[str, Any]],
    path: Path,
    title: str = "Precision-recall curves (test)",
) -> Path:
    """One precision-recall curve per class in one PNG, each class's AP in the legend (a class
    without positives is named there, without a curve)."""
    plt = pyplot()
    ap = {row["class"]: row.get("ap") for row in per_class}
    fig, ax = plt.subplots(figsize=(7.5, 6), dpi=110)
    for name, (precision, recall) in curves.items():
        value = ap.get(name)
        label = f"{name} (AP {value:.3f})" if value is not None else f"{name} (no positives)"
        if precision:
            ax.step(list(recall), list(precision), where="post", lw=2, label=label)
        else:
            ax.plot([], [], label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    legend = ax.legend(fontsize=8, loc="lower left", ncol=2 if len(curves) > 12 else 1)
    for text in legend.get_texts():
        text.set_parse_math(False)  # a "$" in a class name is not a formula
    fig.tight_layout()
    return save_figure(fig, path, plt)


def set_mistakes(
    files: Sequence[str],
    truth: torch.Tensor,
    probs: torch.Tensor,
    decided: Sequence[Sequence[int]],
    class_names: Sequence[str],
    limit: int,
) -> list[dict[str, Any]]:
    """Samples ordered worst first by their worst class (the largest |truth - probability|), at
    most ``limit`` of them: ``true`` and ``predicted`` label sets (space-joined), ``confidence``
    (how sure the model was of its worst wrong call: the probability of a false positive or one
    minus that of a false negative), ``worst_class`` (the class of that call: the report draws
    its Grad-CAM) and ``correct`` (whether the whole label set is right)."""
    if limit <= 0 or len(files) == 0:
        return []
    error = (truth - probs).abs()
    worst, worst_class = error.max(dim=1)
    rows = []
    for i in torch.argsort(worst, descending=True, stable=True)[:limit].tolist():
        true_set = truth[i].nonzero().flatten().tolist()
        predicted = sorted(int(c) for c in decided[i])
        rows.append(
            {
                "file": files[i],
                "true": label_set(true_set, class_names),
                "predicted": label_set(predicted, class_names),
                "confidence": float(worst[i]),
                "worst_class": class_names[int(worst_class[i])],
                "correct": predicted == true_set,
            }
        )
    return rows


def format_per_class(per_class: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-class table as terminal lines."""
    width = max(8, *(len(str(r["class"])) for r in per_class))
    lines = [f"  {'class':<{width}}      ap  precision  recall      f1  support  threshold"]
    for r in per_class:
        ap = f"{r['ap']:>6.4f}" if r["ap"] is not None else "     -"
        lines.append(
            f"  {r['class']:<{width}}  {ap}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}"
            f"  {r['support']:>7}  {r['threshold']:>9.4f}"
        )
    return lines


def evaluate_multilabel(
    module: TransferLearningModule, checkpoint: Path, files: list[str], targets: list[Any],
    probs: torch.Tensor, output: Path, split: str,
) -> dict[str, Any]:  # fmt: skip
    """``eval.py`` on a multi-label checkpoint: the run's test metrics (macro mAP, macro and
    micro F1 and exact match at the checkpoint's thresholds), per-class AP / precision / recall /
    F1 / support, the precision-recall curves and predictions.csv (true and predicted label
    sets, space-joined, and every probability). ``checkpoint``: unused (the single-label
    measure writes predict's confidence threshold beside it; a sigmoid per class has none)."""
    names = module.class_names
    truth = multi_hot(targets, len(names))
    thresholds = (
        module.thresholds if module.thresholds is not None else torch.full((len(names),), DEFAULT_THRESHOLD)
    )
    scores = multilabel_scores(probs, truth, thresholds)
    per_class = multilabel_per_class(probs, truth, thresholds, names)
    picture = save_pr_curves(pr_curves(probs, truth, names), per_class, output / "pr_curves.png",
                             title=f"Precision-recall curves ({split})")  # fmt: skip
    decided = module.decide(probs)
    rows = [
        {"file": f, "true": label_set(sorted(t), names), "predicted": label_set(d, names),
         **{name: float(v) for name, v in zip(names, row, strict=True)}}
        for f, t, d, row in zip(files, targets, decided, probs, strict=True)
    ]  # fmt: skip
    written = {
        "eval.json": str(output / "eval.json"),
        "pr curves": str(picture),
        "per-class metrics": str(write_rows(per_class, output / "per_class_metrics.csv")),
        "predictions": str(write_rows(rows, output / "predictions.csv")),
    }
    return {
        **scores,
        "thresholds": [float(t) for t in thresholds],
        "per_class": per_class,
        "files": written,
    }
