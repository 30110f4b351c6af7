"""Calibrating a trained run and showing how far its probabilities can be trusted.

After fitting, before testing, :func:`calibrate_best` fits the temperature on the validation
split's logits under the best checkpoint (:mod:`transfer_learning.model.calibration`) and writes
it into that checkpoint, which the test, eval, predict, the Python API and export read. After
testing, :func:`measure_test` measures ECE, NLL and the Brier score on the test split before and
after, with a reliability diagram. ``calibrate=false`` keeps the probabilities as the network
gives them (temperature 1) and still measures them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from transfer_learning.data.datamodule import ImageDataModule
from transfer_learning.model.calibration import (
    ECE_BINS,
    MAX_TEMPERATURE,
    PRIOR_SD,
    calibration_metrics,
    choose_temperature,
    reliability_bins,
)
from transfer_learning.model.metrics import choose_thresholds
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.plotting import pyplot, save_figure
from transfer_learning.results.analysis import predict_logits
from transfer_learning.results.multilabel import multi_hot
from transfer_learning.run.checkpoints import atomic_save, safe_load

log = logging.getLogger(__name__)

METRICS = ("ece", "nll", "brier")
NAMES = {"ece": "ECE", "nll": "NLL", "brier": "Brier"}
PICTURE = "reliability_diagram.png"


def targets_tensor(labels: Sequence[Any], num_classes: int, multilabel: bool) -> torch.Tensor:
    """Class indices (N,), or multi-label (N, C) 0/1 rows."""
    if multilabel:
        return multi_hot(labels, num_classes)
    return torch.as_tensor(list(labels), dtype=torch.long)


def uncalibrated(probs: torch.Tensor, temperature: float, multilabel: bool) -> torch.Tensor:
    """The probabilities a temperature of 1 would have given, from calibrated ones (exact: a
    softmax's log-probabilities are the logits up to a constant per row)."""
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    if multilabel:
        return (torch.logit(p) * temperature).sigmoid().to(probs.dtype)
    return (p.log() * temperature).softmax(-1).to(probs.dtype)


def evaluate_calibration(
    probs: torch.Tensor, labels: Sequence[Any], module: TransferLearningModule, output: Path, split: str
) -> tuple[dict[str, Any], Path]:
    """eval.py's calibration numbers for the checkpoint's (calibrated) ``probs``: ECE, NLL and
    Brier with the checkpoint's temperature and with temperature 1, and the reliability diagram
    (``output/reliability_diagram.png``). With ``tta=flip`` the temperature-1 numbers are those
    of the averaged probabilities mapped back, an approximation."""
    multilabel = module.task == "multilabel"
    targets = targets_tensor(labels, len(module.class_names), multilabel)
    temperature = module.temperature
    raw = uncalibrated(probs, temperature, multilabel) if temperature != 1 else probs
    numbers = {
        "temperature": temperature,
        "bins": ECE_BINS,
        "calibrated": calibration_metrics(probs, targets, multilabel),
        "uncalibrated": calibration_metrics(raw, targets, multilabel),
    }
    pictures = {"before (temperature 1)": raw}
    if temperature != 1:
        pictures[f"after (temperature {temperature:.2f})"] = probs
    return numbers, save_reliability_diagram(pictures, targets, multilabel, output / PICTURE, split)


def before_after(uncalibrated: Mapping[str, float], calibrated: Mapping[str, float]) -> str:
    """``ECE 0.2191 -> 0.1433, NLL ..., Brier ...``."""
    return ", ".join(f"{NAMES[k]} {uncalibrated[k]:.4f} -> {calibrated[k]:.4f}" for k in METRICS)


def save_reliability_diagram(
    probs: Mapping[str, torch.Tensor], targets: torch.Tensor, multilabel: bool, path: Path, split: str
) -> Path:
    """One panel per entry of ``probs`` (e.g. before / after calibration): the share right in
    each confidence bin against the bin's mean confidence (a calibrated model sits on the
    diagonal), with the bins' image counts and the ECE in the title."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(probs), figsize=(4.6 * len(probs), 4.4), dpi=100, squeeze=False)
    what = "class probabilities" if multilabel else "top-class probability"
    for ax, (title, p) in zip(axes[0], probs.items(), strict=True):
        bins = reliability_bins(p, targets, multilabel)
        ece = calibration_metrics(p, targets, multilabel)["ece"]
        lows = [b["low"] for b in bins]
        width = bins[0]["high"] - bins[0]["low"]
        accuracy = [b["accuracy"] or 0.0 for b in bins]
        confidence = [b["confidence"] if b["count"] else b["low"] + width / 2 for b in bins]
        ax.bar(
            lows, accuracy, width=width, align="edge", color="#4c72b0", edgecolor="white", label="share right"
        )
        ax.bar(lows, [c - a if b["count"] else 0 for c, a, b in zip(confidence, accuracy, bins, strict=True)],
               bottom=accuracy, width=width, align="edge", color="#dd8452", alpha=0.5,
               label="gap to confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
        for b in bins:
            if b["count"]:
                ax.text(b["low"] + width / 2, 0.01, str(b["count"]), ha="center", va="bottom", fontsize=6)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"confidence ({what})", ylabel="share right")
        ax.set_title(f"{title}: ECE {ece:.3f}", fontsize=10, parse_math=False)
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"Reliability ({split} split, 15 bins; numbers: images per bin)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path, plt)


def _write_into_checkpoint(path: str, checkpoint: dict[str, Any], module: TransferLearningModule) -> None:
    """The temperature (and the multi-label thresholds, which move with it) into ``checkpoint``,
    read from ``path``, and the result back to ``path``."""
    checkpoint["calibration"] = dict(module.calibration or {})
    if module.thresholds is not None:
        checkpoint["thresholds"] = [float(t) for t in module.thresholds]
    atomic_save(checkpoint, path)


def _fit(
    module: TransferLearningModule, datamodule: ImageDataModule, oof: OutOfFold | None = None
) -> tuple[float, dict[str, Any]]:
    """The temperature for the module's current weights, from the validation split's logits, or
    (cv.refit=true, no validation split) from the folds' out-of-fold logits ``oof``."""
    multilabel = module.task == "multilabel"
    if oof is None:
        logits, labels, _ = predict_logits(module, datamodule, "val")
        targets = targets_tensor(labels, len(module.class_names), multilabel)
    else:
        logits, targets = oof
    fit = choose_temperature(logits, targets, multilabel)
    temperature = fit.temperature
    before = calibration_metrics(module.metrics.activation(logits.double()), targets, multilabel)
    after = calibration_metrics(module.metrics.activation(logits.double() / temperature), targets, multilabel)
    record = {
        "method": "temperature scaling: one temperature"
        + (" shared by every class" if multilabel else "")
        + f", fitted with a normal prior on log T (sd {PRIOR_SD}) around 1",
        "fitted": fit.fitted,
        "why": fit.why,
        "fitted_on": "val" if oof is None else "out-of-fold",
        "images": len(targets),
        "val_nll_before": before["nll"],
        "val_nll_after": after["nll"],
    }
    return temperature, record


OutOfFold = tuple[torch.Tensor, torch.Tensor]  # the folds' logits (N, C) and targets (N,) or (N, C)


def calibrate_best(
    trainer: L.Trainer,
    module: TransferLearningModule,
    datamodule: ImageDataModule,
    best_path: str,
    oof: OutOfFold | None = None,
) -> None:
    """After fitting, before testing, on every process: rank zero loads the best checkpoint,
    fits the temperature on the validation split and writes it into that checkpoint (which the
    test then loads, so the run's test numbers are the calibrated model's, as eval's are);
    every process gets the same temperature (a run without checkpoints tests the weights in
    memory).

    cv.refit=true's run has no validation split: the temperature is fitted on the folds'
    out-of-fold logits ``oof`` (the same settings trained on 1 - 1/K of the images, each scored
    on images it did not train on), and multi-label thresholds are chosen on them too."""
    fitted: tuple[float, dict[str, Any]] | None = None
    thresholds: torch.Tensor | None = None
    if trainer.is_global_zero and ("val" in datamodule.datasets or oof is not None):
        checkpoint = safe_load(best_path) if best_path else None
        if checkpoint is not None:
            module.on_load_checkpoint(checkpoint)  # its thresholds, and any earlier calibration
            module.load_state_dict(checkpoint["state_dict"])
        fitted = _fit(module, datamodule, oof)
        if oof is not None and module.task == "multilabel":
            module.thresholds = None  # chosen below, in the calibrated space
        module.calibrate(*fitted)
        if oof is not None and module.task == "multilabel":
            module.thresholds = choose_thresholds(
                module.metrics.activation(oof[0].double() / fitted[0]), oof[1]
            ).float()
        thresholds = module.thresholds
        if checkpoint is not None:
            _write_into_checkpoint(best_path, checkpoint, module)
    fitted, thresholds = trainer.strategy.broadcast((fitted, thresholds))
    if fitted is not None and not trainer.is_global_zero:
        module.calibrate(*fitted)
        if thresholds is not None:
            module.thresholds = thresholds
    trainer.strategy.barrier("calibrated")


def describe(module: TransferLearningModule, enabled: bool) -> str:
    """The summary's ``calibration`` line."""
    record = module.calibration
    if not enabled:
        return "off (calibrate=false): probabilities as the network gives them"
    if record is None:
        return "none: no validation split to fit a temperature on"
    temperature, images = record["temperature"], record["images"]
    nll = f"{record['fitted_on']} NLL {record['val_nll_before']:.4f} -> {record['val_nll_after']:.4f}"
    if record.get("fitted", True):  # checkpoints from before the prior have no "fitted"
        limit = " (at its limit: the network is far more confident than right)"
        return (
            f"temperature {temperature:.3f}"
            + (limit if temperature >= MAX_TEMPERATURE else "")
            + f", fitted on {images} {record['fitted_on']} images"
            + (f" ({record['why']}; {nll})" if record.get("why") else f" ({nll})")
            + "; stored in the best checkpoint"
        )
    return (
        f"temperature 1 kept on the {'val split' if record['fitted_on'] == 'val' else 'out-of-fold images'}"
        f" ({images} images), the network's own "
        f"probabilities: {record['why']}"
    )


def measure_test(
    module: TransferLearningModule,
    logits: torch.Tensor,
    labels: Sequence[Any],
    output_dir: Path,
    enabled: bool,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Rank zero, after testing, from the test split's ``logits`` and ``labels``: ECE, NLL and
    Brier with the module's temperature and with temperature 1, and the reliability diagram.
    Returns the summary's entries and the numbers (``test/ece`` ...: what the checkpoint's
    probabilities score; ``test/ece_uncalibrated`` ...: temperature 1)."""
    multilabel = module.task == "multilabel"
    targets = targets_tensor(labels, len(module.class_names), multilabel)
    raw = module.metrics.activation(logits.double())
    calibrated = module.metrics.activation(logits.double() / module.temperature)
    numbers = {f"test/{k}_uncalibrated": v for k, v in calibration_metrics(raw, targets, multilabel).items()}
    numbers.update({f"test/{k}": v for k, v in calibration_metrics(calibrated, targets, multilabel).items()})
    pictures = {"before (temperature 1)": raw}
    if module.temperature != 1:
        pictures[f"after (temperature {module.temperature:.2f})"] = calibrated
    picture = save_reliability_diagram(pictures, targets, multilabel, output_dir / PICTURE, "test")
    entries = {
        "calibration": describe(module, enabled),
        "calibration on test": before_after(
            {k: numbers[f"test/{k}_uncalibrated"] for k in METRICS},
            {k: numbers[f"test/{k}"] for k in METRICS},
        ),
        "reliability diagram": str(picture),
    }
    return entries, numbers
