"""After testing, once: the run's summary, the report and the pictures, in the run folder and in
the loggers (rank zero writes; every process takes part in the counts)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from transfer_learning.data.datamodule import ImageDataModule
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.results.analysis import (
    per_class_metrics,
    predict_logits,
    predict_split,
    worst_samples,
    write_rows,
)
from transfer_learning.results.calibration_report import measure_test, targets_tensor
from transfer_learning.results.confidence import BOUNDS, headline_intervals, with_intervals
from transfer_learning.results.model_card import FILES, build_card, write_card
from transfer_learning.results.multilabel import multi_hot, save_pr_curves, set_mistakes
from transfer_learning.results.report import write_report
from transfer_learning.results.reporting import (
    build_summary,
    format_summary,
    save_confusion_matrix,
    save_confusion_table,
    write_summary,
)
from transfer_learning.results.test_predictions import FILE as TEST_PREDICTIONS
from transfer_learning.results.test_predictions import FOLD_FILE as FOLD_PREDICTIONS
from transfer_learning.results.test_predictions import write_test_predictions
from transfer_learning.run.averaging import weight_averaging
from transfer_learning.run.loggers import (
    CSVLogger,
    log_checkpoint,
    log_confusion_matrix,
    log_picture,
    log_pr_curves,
    log_results,
    log_table,
    logger_locations,
)

log = logging.getLogger(__name__)


def finish_run(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: TransferLearningModule,
    datamodule: ImageDataModule,
    loggers: list[Logger],
    best_path: str,
    fit_metrics: dict[str, float | None],
    test_metrics: dict[str, float | None],
    facts: dict[str, Any],
    tuned: dict[str, str],
) -> dict[str, Any]:
    """Called once after the best checkpoint was tested: the summary (printed and in
    ``summary.json``), the report and its pictures; returns the summary."""
    output_dir = Path(cfg.paths.output_dir)
    model_name = cfg.model.get("name") or cfg.model._target_.rsplit(".", 1)[-1]
    skipped = datamodule.count_skipped()  # files that broke mid-run (data.on_bad_file=skip)
    if skipped and trainer.is_global_zero:
        log.warning(
            "Left out %d file(s) that could not be read during the run, each with its label: %s",
            sum(skipped.values()), ", ".join(f"{split} {n}" for split, n in skipped.items()),
        )  # fmt: skip

    summary = build_summary(
        trainer, module, datamodule, model_name, fit_metrics, test_metrics, output_dir, facts
    )
    summary.update(tuned)
    summary["weight averaging"] = weight_averaging(trainer)
    if trainer.is_global_zero:
        enabled = bool(cfg.get("calibrate", True))
        logits, labels, files = predict_logits(module, datamodule, "test")
        entries, numbers = measure_test(module, logits, labels, output_dir, enabled)
        summary.update(entries)
        summary.update(numbers)
        test_metrics = {**test_metrics, **numbers}
        log_results(loggers, numbers)
        summary = with_intervals(summary, _test_intervals(module, logits, labels), len(labels), ANCHORS)
        summary["test predictions"] = str(
            _write_predictions(module, logits, labels, files, output_dir / TEST_PREDICTIONS)
        )
        if datamodule.cv_folds and not datamodule.refit:  # a fold: its val images are out-of-fold
            fold = predict_logits(module, datamodule, "val")
            summary["fold predictions"] = str(
                _write_predictions(module, *fold, output_dir / FOLD_PREDICTIONS, raw=True)
            )
        bounds = {k: v for k, v in summary.items() if k.endswith(BOUNDS)}
        log_results(loggers, bounds)
        log_picture(loggers, "test/reliability_diagram", Path(entries["reliability diagram"]))
        summary.update(
            _report(cfg, module, datamodule, loggers, output_dir, best_path, test_metrics, summary)
        )
        summary.update(logger_locations(loggers))
        summary["model card"] = str(_model_card(cfg, module, datamodule, output_dir, best_path, summary))
        write_summary(summary, output_dir / "summary.json")
        # The calibration numbers are in summary.json; printed once, as "before -> after".
        shown = {k: v for k, v in summary.items() if k not in numbers and k not in bounds}
        print(format_summary(shown), flush=True)
    return summary


ANCHORS = {"test/ece": "calibration on test"}


def _model_card(
    cfg: DictConfig, module: TransferLearningModule, datamodule: ImageDataModule, output_dir: Path,
    best_path: str, summary: dict[str, Any],
) -> Path:  # fmt: skip
    """MODEL_CARD.md and model_card.json in the run folder, from what the run knows."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    strategy = OmegaConf.to_container(cfg.strategy, resolve=True) if "strategy" in cfg else {}
    assert isinstance(strategy, dict)
    files = {name: rel for name, rel in FILES.items() if (output_dir / rel).is_file() or name == "summary"}
    if best_path:
        best = Path(best_path)
        files = {
            "checkpoint": str(best.relative_to(output_dir) if best.is_relative_to(output_dir) else best),
            **files,
        }
    card = build_card(
        summary, module, {name: len(pair[0]) for name, pair in datamodule.split_files.items()},
        datamodule.train_class_counts, datamodule.data_warnings, datamodule.left_out, overrides,
        {str(k): v for k, v in strategy.items() if not isinstance(v, dict | list)}, files,
        cfg.model.get("weights"),
    )  # fmt: skip
    return write_card(output_dir, card)  # printed under the before -> after line


def _test_probabilities(module: TransferLearningModule, logits: torch.Tensor) -> torch.Tensor:
    """What the test metrics scored: the logits with the checkpoint's temperature, activated."""
    return module.metrics.activation(logits.double() / module.temperature)


def _write_predictions(
    module: TransferLearningModule,
    logits: torch.Tensor,
    labels: list[Any],
    files: list[str],
    path: Path,
    raw: bool = False,
) -> Path:
    """``test_predictions.json``: each test image's probabilities (as the test scored them) and
    target (the sweep table compares two jobs on them); a fold's ``fold_predictions.json``: the
    same for its val images (cross-validation's out-of-fold predictions), with ``raw`` the
    logits before the temperature too."""
    thresholds = None
    if module.task == "multilabel":  # as the test scored them (0.5 before any tuning)
        chosen = module.thresholds
        thresholds = [float(t) for t in chosen] if chosen is not None else [0.5] * len(module.class_names)
    probs = _test_probabilities(module, logits)
    return write_test_predictions(
        path,
        module.task,
        list(module.class_names),
        thresholds,
        files,
        labels,
        probs,
        logits.double() if raw else None,
    )


def _test_intervals(
    module: TransferLearningModule, logits: torch.Tensor, labels: list[Any]
) -> dict[str, Any]:
    """The 95 % interval of every headline test metric (``test/acc``, ``test/f1``, ``test/ece``;
    multi-label ``test/exact_match``, ``test/map``, ``test/f1``) from the test split's logits with
    the checkpoint's temperature and thresholds: the probabilities the test metrics scored."""
    multilabel = module.task == "multilabel"
    probs = _test_probabilities(module, logits)
    targets = targets_tensor(labels, len(module.class_names), multilabel)
    found = headline_intervals(probs, targets, multilabel, module.thresholds if multilabel else None)
    return {f"test/{metric}": bounds for metric, bounds in found.items()}


def _write_report(
    output_dir: Path,
    loggers: list[Logger],
    results_picture: Path,
    per_class: list[dict[str, Any]],
    worst: list[dict[str, Any]],
    summary: dict[str, Any],
    explain: Callable[[list[Mapping[str, Any]], list[Any]], list[Any]] | None,
) -> Path:
    """report.md beside the checkpoints (its pictures also go to W&B)."""
    from hydra.core.hydra_config import HydraConfig

    csv_path = None
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            logger.save()
            csv_path = Path(logger.log_dir) / "metrics.csv"
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    path = write_report(output_dir, summary, overrides, csv_path, results_picture, per_class, worst, explain)
    for name in ("learning_curves", "learning_rates", "confident_mistakes"):
        if (output_dir / f"{name}.png").is_file():
            log_picture(loggers, f"report/{name}", output_dir / f"{name}.png")
    return path


def _report(
    cfg: DictConfig,
    module: TransferLearningModule,
    datamodule: ImageDataModule,
    loggers: list[Logger],
    output_dir: Path,
    best_path: str,
    test_metrics: dict[str, float | None],
    summary: dict[str, Any],
) -> dict[str, str]:
    """Rank zero, after testing: the confusion matrix (multi-label: the per-class AP table and
    the precision-recall curves), per-class metrics and the worst validation images, as files in
    the run folder and (with W&B) as pictures and tables."""
    names = module.class_names
    if module.task == "multilabel":
        picture, per_class = _multilabel_results(module, loggers, output_dir)
        where = {"precision-recall curves": str(picture)}
    else:
        picture, per_class = _confusion_results(module, loggers, output_dir)
        where = {"confusion matrix": str(picture)}  # counts: confusion_matrix.csv
    log_table(loggers, "test/per_class", per_class)
    where["per-class metrics"] = str(write_rows(per_class, output_dir / "per_class_metrics.csv"))
    limit = int(cfg.get("worst_samples") or 0)
    worst: list[dict[str, Any]] = []
    if limit > 0 and "val" in datamodule.datasets:  # (cv.refit=true's run has no val split)
        worst = _worst(module, datamodule, limit)
        where["worst val images"] = str(write_rows(worst, output_dir / "val_predictions.csv"))
        log_table(
            loggers, "val/worst_predictions", [{"image": r["file"], **r} for r in worst], images="image"
        )
    explain = _explainer(module, "worst_class" if module.task == "multilabel" else "predicted")
    where["report"] = str(_write_report(output_dir, loggers, picture, per_class, worst, summary, explain))
    metadata: dict[str, Any] = {"class_names": names, "task": module.task, "temperature": module.temperature}
    if module.thresholds is not None:
        metadata["thresholds"] = [float(t) for t in module.thresholds]
    log_checkpoint(
        loggers, best_path, {**metadata, **{k: v for k, v in test_metrics.items() if v is not None}}
    )
    return where


def _confusion_results(
    module: TransferLearningModule, loggers: list[Logger], output_dir: Path
) -> tuple[Path, list[dict[str, Any]]]:
    """Single-label: the confusion matrix (picture, counts, W&B plot) and per-class metrics."""
    matrix, names = module.test_confusion_matrix, module.class_names
    assert matrix is not None
    picture = save_confusion_matrix(matrix, names, output_dir / "confusion_matrix.png")
    save_confusion_table(matrix, names, output_dir / "confusion_matrix.csv")
    log_picture(loggers, "test/confusion_matrix", picture)
    log_confusion_matrix(loggers, "test/confusion_matrix_plot", matrix, names)
    return picture, per_class_metrics(matrix, names)


def _multilabel_results(
    module: TransferLearningModule, loggers: list[Logger], output_dir: Path
) -> tuple[Path, list[dict[str, Any]]]:
    """Multi-label: the per-class AP / precision / recall / F1 / support rows and the
    precision-recall curves (picture and W&B line plot), from the test results."""
    per_class = list(module.test_results["per_class"])
    curves = module.test_results["pr_curves"]
    picture = save_pr_curves(curves, per_class, output_dir / "pr_curves.png")
    log_picture(loggers, "test/pr_curves", picture)
    log_pr_curves(loggers, "test/pr_curves_plot", curves)
    return picture, per_class


def _explainer(
    module: TransferLearningModule, column: str
) -> Callable[[list[Mapping[str, Any]], list[Any]], list[Any]]:
    """Grad-CAM, for the report's grid, of the class each mistake's row names in ``column``: the
    predicted class, or for a multi-label row the class of its worst call."""
    from transfer_learning.results.explain import explain_images

    def explain(rows: list[Mapping[str, Any]], images: list[Any]) -> list[Any]:
        return explain_images(module, images, [module.class_names.index(str(r[column])) for r in rows])

    return explain


def _worst(module: TransferLearningModule, datamodule: ImageDataModule, limit: int) -> list[dict[str, Any]]:
    """The validation samples the model gets most wrong (multi-label: by their worst class)."""
    files, labels, probs = predict_split(module, datamodule, "val")
    if module.task != "multilabel":
        return worst_samples(files, labels, probs, module.class_names, limit)
    truth = multi_hot(labels, len(module.class_names))
    return set_mistakes(files, truth, probs, module.decide(probs), module.class_names, limit)
