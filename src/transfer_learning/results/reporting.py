"""What a person reads after a run: the summary block, the confusion matrix picture and table."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from transfer_learning.data.datamodule import ImageDataModule
from transfer_learning.escaping import csv_row, visible
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.plotting import pyplot, save_figure


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, torch.Tensor | float | int) else None


def shorten(names: Sequence[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def best_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that keeps the best model (it monitors a metric); else any."""
    callbacks = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]  # type: ignore[attr-defined]
    return next((c for c in callbacks if c.monitor), callbacks[0] if callbacks else None)


def build_summary(
    trainer: L.Trainer,
    module: TransferLearningModule,
    datamodule: ImageDataModule,
    model_name: str,
    fit_metrics: Mapping[str, float | None],
    test_metrics: Mapping[str, float | None],
    output_dir: Path,
    facts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    checkpoint = best_checkpoint(trainer)
    facts = facts or {}
    best_score = checkpoint.best_model_score if checkpoint else None
    sizes = datamodule.split_sizes()
    names = module.class_names
    return {
        "model": model_name,
        "pretrained backbone": "yes" if module.net.pretrained else "NO (random init, model.weights=null)",
        "strategy": module.strategy.name,
        "input size": module.preprocessing.crop_size,
        "data": datamodule.describe(),
        "task": module.task,
        "classes": f"{len(names)} ({shorten(names)})",
        "parameters": _parameters(facts) if facts else None,
        "batch size": _batch(facts) if facts else None,
        "precision": f"{facts['precision']} ({facts['precision/why']})" if "precision" in facts else None,
        f"images {'/'.join(sizes)}": "/".join(str(n) for n in sizes.values()),
        "files left out": ", ".join(f"{n} ({why})" for why, n in datamodule.left_out.items()) or None,
        "feature cache": datamodule.feature_cache.report() if datamodule.feature_cache else None,
        "linear probe": _probe(module.probe_result),
        "epochs run": trainer.current_epoch,
        f"best {module.monitor}": number(best_score)
        if best_score is not None
        else fit_metrics.get(module.monitor),
        "thresholds": _thresholds(module),
        **{k: v for k, v in test_metrics.items() if k != "test/loss"},
        "best checkpoint": (checkpoint.best_model_path if checkpoint else "") or "(none saved)",
        "output dir": str(output_dir),
    }


def _thresholds(module: TransferLearningModule) -> str | None:
    """Multi-label: each class's decision threshold (chosen on validation)."""
    if module.thresholds is None:
        return None
    pairs = zip(module.class_names, module.thresholds.tolist(), strict=True)
    return ", ".join(f"{name} {value:.3f}" for name, value in pairs)


def _probe(result: Mapping[str, float] | None) -> str | None:
    """What the strategy's step before fit returned: for LP-FT, how the head started fine-tuning;
    for any other strategy, its numbers as they are."""
    if not result:
        return None
    if {"val_acc", "weight_decay"} <= set(result):
        return f"val acc {result['val_acc']:.4f} before fine-tuning (L2 {result['weight_decay']:.0e})"
    return ", ".join(f"{name} {value:.4g}" for name, value in result.items())


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _parameters(facts: Mapping[str, Any]) -> str:
    return (
        f"{_count(facts['params/total'])} total, {_count(facts['params/trainable'])} trainable, "
        f"{_count(facts['params/frozen'])} frozen"
    )


def _batch(facts: Mapping[str, Any]) -> str:
    processes = facts["devices"] * facts["num_nodes"]
    accumulate = facts["accumulate_grad_batches"]
    rows = " feature vectors" if facts.get("batch/cached_features") else ""
    if processes == 1 and accumulate == 1:
        return f"{facts['batch/per_device']}{rows}"
    steps = f" x {accumulate} accumulated" if accumulate > 1 else ""
    per_device = f"{facts['batch/per_device']}{rows} per device"
    return f"{per_device} x {processes} devices{steps} = {facts['batch/effective']}"


def save_confusion_matrix(
    matrix: torch.Tensor, class_names: Sequence[str], path: Path, title: str = "Test confusion matrix"
) -> Path:
    """Row-normalised confusion matrix (true class down, predicted across) as a PNG."""
    plt = pyplot()

    counts = matrix.detach().cpu().double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(class_names)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    # Many classes: smaller, vertical names, so that each fits its cell. Names are shown as
    # written: a "$" in a folder name is not the start of a formula (mathtext would fail on "$x^$").
    font = 10 if n <= 30 else max(5, int(700 / n))
    ax.set_xticks(range(n), class_names, rotation=45 if n <= 30 else 90, ha="right" if n <= 30 else "center",
                  fontsize=font, parse_math=False)  # fmt: skip
    ax.set_yticks(range(n), class_names, fontsize=font, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path, plt, dpi=110)


def save_confusion_table(matrix: torch.Tensor, class_names: Sequence[str], path: Path) -> Path:
    """The counts as CSV: one row per true class, one column per predicted class (class names
    that a spreadsheet would run as formulas get a leading ``'``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_row(["true \\ predicted", *class_names]))
        for name, row in zip(class_names, matrix.tolist(), strict=True):
            writer.writerow(csv_row([name, *(int(v) for v in row)]))
    return path


def format_summary(summary: Mapping[str, Any]) -> str:
    def fmt(value: Any) -> str:  # on one line, whatever the class and file names hold
        return f"{value:.4f}" if isinstance(value, float) else visible(value)

    width = max(len(k) for k in summary)
    lines = [f"  {key:<{width}}  {fmt(value)}" for key, value in summary.items() if value is not None]
    bar = "=" * 72
    return "\n".join([bar, "  Run summary", bar, *lines, bar])


def write_summary(summary: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
