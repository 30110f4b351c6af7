"""report.md: the file a person opens first after a run, next to its checkpoints.

It holds the settings that differ from the defaults, the learning curves, each param group's
learning rate, the normalised confusion matrix, the per-class metrics and the validation
images the model got most confidently wrong; the pictures are PNG files beside it, linked
relatively, so the report renders wherever the run folder is copied. The curves come from the
run's CSV metrics (kept across resumes), so they need the CSV logger (on by default).
A multi-label run (``task=multilabel``) shows mean average precision in the curves, the
precision-recall curves (``pr_curves.png``) where the confusion matrix would be, per-class AP
and thresholds in the table, and the validation images whose label set is most confidently wrong.

Names go in as they are written: ``|`` and newlines in a class or file name are escaped in the
tables, and a ``$`` in a picture's title is not a formula. A validation image that cannot be
opened any more when the report is drawn (deleted, overwritten since) is left out of the grid
and named under it, and in the log: the report is still written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transfer_learning.escaping import markdown_cell, visible
from transfer_learning.plotting import pyplot, save_figure
from transfer_learning.readers import read_csv_records
from transfer_learning.results.image_grid import plot_confident_mistakes
from transfer_learning.results.label_issues import FILE as LABEL_ISSUES

REPORT = "report.md"
log = logging.getLogger(__name__)


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def read_metrics(path: Path | None) -> list[dict[str, str]]:
    if path is None:
        return []
    return read_csv_records(path)[1]


def epoch_curves(rows: Sequence[Mapping[str, str]], score: str = "acc") -> dict[str, dict[int, float]]:
    """Per-epoch values of the train and val loss and ``score`` (``acc``; multi-label ``map``,
    logged for validation only), the last logged per epoch."""
    keys = {
        "train/loss": "train/loss_epoch",
        "train/acc": f"train/{score}",
        "val/loss": "val/loss",
        "val/acc": f"val/{score}",
    }
    curves: dict[str, dict[int, float]] = {name: {} for name in keys}
    for row in rows:
        epoch = _number(row.get("epoch"))
        if epoch is None:
            continue
        for name, column in keys.items():
            value = _number(row.get(column))
            if value is not None:
                curves[name][int(epoch)] = value
    return curves


def plot_learning_curves(
    rows: Sequence[Mapping[str, str]], path: Path, score: str = "acc", cached: bool = False
) -> Path | None:
    """Loss and accuracy (multi-label: ``score="map"``) per epoch, train and val, side by side
    in one PNG. ``cached``: the head trained on the frozen backbone's cached features (feature
    extraction), not on augmented batches of images."""
    curves = epoch_curves(rows, score)
    score_name = "accuracy" if score == "acc" else "mean average precision"
    loss_name = "cross-entropy loss" if score == "acc" else "binary cross-entropy loss"
    if not any(curves.values()):
        return None
    plt = pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, kind in ((loss_ax, "loss"), (acc_ax, "acc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            points = sorted(curves[f"{split}/{kind}"].items())
            if points:
                ax.plot([e + 1 for e, _ in points], [v for _, v in points], style, ms=4, lw=2, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(score_name if kind == "acc" else loss_name)
        ax.set_title(score_name.capitalize() if kind == "acc" else "Loss")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    acc_ax.set_ylim(-0.02, 1.02)
    trained_on = "cached backbone features" if cached else "augmented batches"
    fig.suptitle(f"Learning curves (train: {trained_on} during the epoch; val: after it)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, plt)


def plot_learning_rates(rows: Sequence[Mapping[str, str]], path: Path) -> Path | None:
    """Each param group's learning rate against the training step (log scale when positive)."""
    columns = [c for c in (rows[0] if rows else {}) if c.startswith("lr-")]
    series: dict[str, list[tuple[float, float]]] = {}
    for column in columns:
        pairs = [(_number(r.get("step")), _number(r.get(column))) for r in rows]
        kept = [(s, v) for s, v in pairs if s is not None and v is not None]
        if kept:
            series[column.split("/", 1)[-1] if "/" in column else column.removeprefix("lr-")] = kept
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    for name, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], "-o", ms=3, lw=2, label=name)
    positive = [v for points in series.values() for _, v in points if v > 0]
    if positive and max(positive) / min(positive) > 20:  # rates orders of magnitude apart
        if len(positive) < sum(len(points) for points in series.values()):  # 0 = frozen: linear near 0
            ax.set_yscale("symlog", linthresh=min(positive))
        else:
            ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate of each param group")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(series) > 8 else 1, loc="best")
    fig.tight_layout()
    return save_figure(fig, path, plt)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    """A Markdown table; each cell on one line, with its ``|`` escaped (:func:`markdown_cell`)."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else markdown_cell(value)

    return [
        "| " + " | ".join(markdown_cell(c) for c in columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows),
    ]


def write_report(
    folder: Path,
    summary: Mapping[str, Any],
    overrides: Sequence[str],
    metrics_csv: Path | None,
    results_png: Path | None,
    per_class: Sequence[Mapping[str, Any]],
    worst: Sequence[Mapping[str, Any]],
    explain: Callable[[list[Mapping[str, Any]], list[Any]], list[Any]] | None = None,
) -> Path:
    """Write ``folder/report.md`` and its pictures; return the report's path. ``results_png``:
    the confusion matrix, or for a multi-label run (``summary["task"]``) the precision-recall
    curves, whose ``per_class`` rows also carry AP and the threshold."""
    multilabel = summary.get("task") == "multilabel"
    rows = read_metrics(metrics_csv)
    cached = bool(summary.get("feature cache"))
    curves = plot_learning_curves(
        rows, folder / "learning_curves.png", "map" if multilabel else "acc", cached
    )
    rates = plot_learning_rates(rows, folder / "learning_rates.png")
    skipped: list[tuple[str, str]] = []
    mistakes = plot_confident_mistakes(
        worst, folder / "confident_mistakes.png", skipped=skipped, explain=explain
    )
    if skipped:
        log.warning("The report leaves out %d validation image(s) it cannot open any more: %s",
                    len(skipped), "; ".join(f"{file} ({why})" for file, why in skipped))  # fmt: skip

    def picture(title: str, path: Path | None, missing: str) -> list[str]:
        if path is None:
            return [f"## {title}", "", f"_{missing}_", ""]
        return [f"## {title}", "", f"![{title}]({path.relative_to(folder).as_posix()})", ""]

    headline = ("model", "strategy", "task", "classes", "images train/val/test", "images train/test",
                "epochs run", "best val/acc", "best val/map", "test/acc", "test/map", "test/f1",
                "test/f1_micro", "test/exact_match", "thresholds", "best checkpoint")  # fmt: skip
    lines = [f"# Run report: {summary.get('model')} with {summary.get('strategy')}", ""]
    rows_shown = [{"": k, "value": summary[k], "95 % interval": summary.get(f"{k} 95 %", "")}
                  for k in headline if summary.get(k) is not None]  # fmt: skip
    lines += _table(rows_shown, ["", "value", "95 % interval"])
    lines += ["", "## Settings that differ from the defaults", ""]
    lines += [f"- `{visible(o)}`" for o in overrides] or ["- none: `python train.py` with the defaults"]
    lines += [""]
    no_csv = "No CSV metrics in this run (logger without csv): no curves."
    lines += picture("Learning curves", curves, no_csv)
    lines += picture("Learning rate of each param group", rates, no_csv)
    if multilabel:
        lines += picture("Precision-recall curves (test)", results_png, "No test precision-recall curves.")
        columns = ["class", "ap", "precision", "recall", "f1", "support", "threshold"]
    else:
        lines += picture("Confusion matrix (test, rows normalised)", results_png, "No test confusion matrix.")
        columns = ["class", "precision", "recall", "f1", "support"]
    if summary.get("calibration on test"):
        lines += ["## Calibration (test)", ""]
        ece = summary.get("test/ece 95 %")
        lines += [f"- {visible(str(summary.get('calibration')))}",
                  f"- before -> after: {summary['calibration on test']}",
                  *([f"- test ECE 95 % interval: {ece}"] if ece else []), ""]  # fmt: skip
        diagram = summary.get("reliability diagram")
        lines += picture("Reliability diagram", Path(diagram) if diagram else None, "No reliability diagram.")
    lines += ["## Per-class metrics (test)", ""]
    lines += [*_table(per_class, columns), ""]
    lines += picture(
        "Most confidently wrong validation images",
        mistakes,
        "None of the wrong validation images listed could be opened."
        if skipped
        else "No wrong validation image among the worst ones listed (or worst_samples=0).",
    )
    if skipped:
        named = "; ".join(f"`{visible(file)}` ({visible(why)})" for file, why in skipped)
        lines += [f"Not shown: {len(skipped)} image(s) could not be opened (changed or removed since "
                  f"the run read them): {named}.", ""]  # fmt: skip
    path = folder / REPORT
    path.write_text("\n".join(lines))
    return path


def write_cv_report(
    folder: Path, summary: Mapping[str, Any], issues: Sequence[Mapping[str, Any]], picture: Path | None
) -> Path:
    """``folder/report.md`` of a cv=K run: its summary (each metric as mean ± std over the folds)
    and the likely label errors, their picture and the first of them as a table. Each fold's own
    report is in its folder."""
    rows = [{"": k, "value": v} for k, v in summary.items() if isinstance(v, str | int | float)]
    lines = [f"# Cross-validation report: {summary.get('cross-validation')}", ""]
    lines += [*_table(rows, ["", "value"]), "", "## Likely label errors (out of fold)", ""]
    if not issues:
        lines += ["_Confident learning found no likely label error in the out-of-fold predictions._", ""]
    else:
        if picture is not None:
            lines += [f"![Likely label errors]({picture.relative_to(folder).as_posix()})", ""]
        columns = [c for c in ("rank", "file", "class", "given", "suggested", "score") if c in issues[0]]
        lines += [*_table(issues[:50], columns), ""]
        if len(issues) > 50:
            lines += [f"{len(issues) - 50} more in {LABEL_ISSUES}.", ""]
    path = folder / REPORT
    path.write_text("\n".join(lines))
    return path
