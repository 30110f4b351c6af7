"""k-fold cross-validation (``cv=K``): one run folder, K fold runs in it, one summary.

On a few hundred images a 60-image validation split moves every number by several points. With
``cv=K`` the training+validation images are dealt into K stratified, seeded folds (the test split
stays held out, as without folds); fold k trains on the others and validates on it, as an
ordinary run in ``<run>/folds/fold<k>/`` (checkpoints, calibration, test, report). Then:

- ``<run>/summary.json`` and the printed summary give each metric as mean ± std over the folds
  (sample standard deviation) with the per-fold values;
- ``<run>/oof_predictions.csv``: every training+validation image's probabilities from the fold
  model that did not train on it (its best checkpoint, calibrated), with the fold;
- the value a sweep optimises is the mean over folds.

Feature extraction computes the backbone's features of all training+validation images once,
under one cache key, and each fold reads its rows (:meth:`ImageDataModule._fold_features`).

A fold that finished wrote ``fold.json``; a cv run started again (``ckpt_path=last``, or the
fold's ``.../folds/fold<k>/checkpoints/last.ckpt``) skips those folds and continues the one
that was interrupted from its ``last.ckpt``. ``fold.json`` is read back as data.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from transfer_learning.data.splits import REFIT, check_folds
from transfer_learning.errors import ConfigError
from transfer_learning.escaping import csv_row
from transfer_learning.readers import UntrustedFileError, read_json
from transfer_learning.results.analysis import write_rows
from transfer_learning.results.label_issues import FILE as LABEL_ISSUES
from transfer_learning.results.label_issues import PICTURE as LABEL_PICTURE
from transfer_learning.results.label_issues import SHOWN as SHOWN_ISSUES
from transfer_learning.results.label_issues import OutOfFold, find_label_issues, plot_label_issues
from transfer_learning.results.label_issues import describe as describe_issues
from transfer_learning.results.report import write_cv_report
from transfer_learning.results.reporting import format_summary, write_summary
from transfer_learning.results.test_predictions import FOLD_FILE as FOLD_PREDICTIONS
from transfer_learning.results.test_predictions import read_test_predictions
from transfer_learning.run.loggers import close_loggers, log_picture, log_results, log_table
from transfer_learning.run.resume import save_run_settings

log = logging.getLogger(__name__)

FOLDS_DIR = "folds"
FOLD_RECORD = "fold.json"
OOF_FILE = "oof_predictions.csv"
REFIT_DIR = "refit"
# The summary's numbers, per fold and as mean ± std (those a fold's summary has).
SHOWN = ("best val/acc", "best val/map", "test/acc", "test/f1", "test/map", "test/exact_match", "test/ece")


def fold_folder(run: Path, fold: int) -> Path:
    """``<run>/folds/fold<k>``; the refit's (``fold`` = REFIT) ``<run>/folds/refit``."""
    return run / FOLDS_DIR / (REFIT_DIR if fold == REFIT else f"fold{fold}")


def _fold_config(cfg: DictConfig, fold: int, folds: int, folder: Path) -> DictConfig:
    """The run's settings for one fold: its folder, its split, and no folds of its own."""
    fold_cfg = copy.deepcopy(cfg)
    with open_dict(fold_cfg):
        fold_cfg.paths.output_dir = str(folder)
        fold_cfg.data.cv_folds = folds
        fold_cfg.data.cv_fold = fold
        fold_cfg.cv.folds = None
        last = folder / "checkpoints" / "last.ckpt"
        fold_cfg.ckpt_path = str(last) if last.is_file() else None
        wandb = (fold_cfg.get("logger") or {}).get("wandb")
        if wandb is not None:  # each fold a W&B run, the folds of a run one group
            wandb.group = wandb.get("group") or f"cv-{folder.parent.parent.name}"
            wandb.name = f"{wandb.get('name') or 'train'} {folder.name}"
    return fold_cfg


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    return out


def read_fold(path: Path, fold: int, folds: int) -> dict[str, Any]:
    """A finished fold's ``fold.json``, checked: this fold of this many, numbers only."""
    fix = f"Delete {path.parent} to train that fold again."
    record = read_json(path, fix=fix)
    if not isinstance(record, dict) or record.get("fold") != fold or record.get("folds") != folds:
        raise UntrustedFileError(f"refusing {path}: it is not the record of fold {fold} of {folds}. {fix}")
    metrics, summary = record.get("metrics"), record.get("summary")
    if not isinstance(metrics, dict) or not isinstance(summary, dict):
        raise UntrustedFileError(f"refusing {path}: its 'metrics' and 'summary' must be mappings. {fix}")
    if _numbers(metrics) != metrics or _numbers(summary) != summary:
        raise UntrustedFileError(f"refusing {path}: its metrics must all be numbers. {fix}")
    intervals = record.get("intervals", {})  # (the refit's: printed in the cv summary)
    if not isinstance(intervals, dict) or not all(
        k in SHOWN and isinstance(v, str) and len(v) < 80 and v.isprintable() for k, v in intervals.items()
    ):
        raise UntrustedFileError(f"refusing {path}: its 'intervals' must map metrics to short text. {fix}")
    return record


def _write_fold(path: Path, record: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def cross_validate(cfg: DictConfig, train_one: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any]:
    """Train every fold of ``cfg.cv.folds`` with ``train_one`` (one ordinary run), skipping the
    finished ones; then the out-of-fold predictions and the summary. Returns the mean over folds
    of every metric the folds share (``<metric>_std`` beside each) and ``summary``."""
    folds = check_folds(cfg.cv.get("folds"))
    assert folds is not None
    refit = bool(cfg.cv.get("refit"))
    scheduler = cfg.get("scheduler")
    if refit and isinstance(scheduler, DictConfig) and str(scheduler.get("monitor") or "").startswith("val/"):
        raise ConfigError(  # (before any fold trains)
            f"cv.refit=true with scheduler.monitor={scheduler.monitor}: the refit has no validation "
            "split to watch; pick a scheduler that does not monitor one (e.g. scheduler=cosine)."
        )
    if refit and float(cfg.data.get("test_fraction") or 0) <= 0 and not cfg.data.get("test_dir"):
        log.warning("cv.refit=true with no test split set up: the refit will stop if the data has none")
    if cfg.get("tune_lr"):
        raise ConfigError(
            "tune_lr=true with cv: run the learning-rate finder once without cv, then pass its rate."
        )
    run = Path(cfg.paths.output_dir)
    if HydraConfig.initialized():  # what ckpt_path=last restores: the cv run's own settings
        save_run_settings(run, HydraConfig.get().overrides.task)
    records = []
    for fold in range(folds):
        folder = fold_folder(run, fold)
        done = folder / FOLD_RECORD
        if done.is_file():
            log.info("Fold %d of %d finished before (%s): not trained again", fold + 1, folds, done)
            records.append(read_fold(done, fold, folds))
            continue
        log.info("Fold %d of %d: %s", fold + 1, folds, folder)
        record = _record(fold, folds, train_one(_fold_config(cfg, fold, folds, folder)))
        _write_fold(done, record)
        records.append(record)
    predictions, fold_of, _ = read_oof(run, folds)
    oof = write_oof(run, predictions, fold_of)
    final = _refit(cfg, folds, run, train_one) if refit else None
    summary = cv_summary(records, folds, oof, final)
    issues = find_label_issues(predictions)
    found = write_rows(issues, run / LABEL_ISSUES) if issues else _no_issues(run, predictions.multilabel)
    summary["label issues"] = describe_issues(issues, found)
    picture = plot_label_issues(issues, run / LABEL_PICTURE)
    summary["label issues picture"] = str(picture) if picture else None
    summary["report"] = str(write_cv_report(run, summary, issues, picture))
    _log_cv_run(cfg, run, summary, issues)
    write_summary(summary, run / "summary.json")
    print(format_summary({k: v for k, v in summary.items() if k != "cv"}), flush=True)
    # the folds' interval bounds do not average into an interval: the spread over folds says it
    shared = {k for k in set.intersection(*(set(r["metrics"]) for r in records)) if "_ci95_" not in k}
    means: dict[str, Any] = {}
    for key in sorted(shared):
        values = [r["metrics"][key] for r in records]
        means[key] = statistics.fmean(values)
        means[f"{key}_std"] = statistics.stdev(values)
    return {**means, "cv/folds": folds, "summary": summary}


def _refit(
    cfg: DictConfig, folds: int, run: Path, train_one: Callable[[DictConfig], dict[str, Any]]
) -> dict[str, Any]:
    """cv.refit=true: the final model, trained as the folds were on every training+validation
    image (no validation split: the last epoch is the checkpoint, early stopping is off, the
    temperature and any multi-label thresholds come from the folds' out-of-fold logits), tested
    on the test split, in ``<run>/folds/refit/``. Done once: a finished refit is read back."""
    folder = fold_folder(run, REFIT)
    done = folder / FOLD_RECORD
    if done.is_file():
        log.info("The refit finished before (%s): not trained again", done)
        return read_fold(done, REFIT, folds)
    log.info("Refit on every training+validation image: %s", folder)
    refit_cfg = _fold_config(cfg, REFIT, folds, folder)
    with open_dict(refit_cfg):
        callbacks = refit_cfg.get("callbacks") or DictConfig({})
        if callbacks.get("early_stopping") is not None:
            callbacks.early_stopping = None  # nothing to stop on: the folds chose trainer.max_epochs
        if callbacks.get("model_checkpoint") is not None:
            callbacks.model_checkpoint.monitor = None  # no val metric: the last epoch's weights
            callbacks.model_checkpoint.filename = "refit-epoch{epoch:02d}"
    record = _record(REFIT, folds, train_one(refit_cfg))
    _write_fold(done, record)
    return record


def _record(fold: int, folds: int, result: Mapping[str, Any]) -> dict[str, Any]:
    """``fold.json`` of a finished fold (or the refit): its numbers, intervals and checkpoint."""
    summary = result.get("summary") or {}
    return {
        "fold": fold,
        "folds": folds,
        "metrics": _numbers({k: v for k, v in result.items() if k != "summary"}),
        "summary": _numbers({k: summary.get(k) for k in SHOWN}),
        "intervals": {k: str(summary[f"{k} 95 %"]) for k in SHOWN if summary.get(f"{k} 95 %") is not None},
        "best checkpoint": str(summary.get("best checkpoint") or result.get("best_checkpoint") or ""),
    }


def _no_issues(run: Path, multilabel: bool) -> Path:
    """An empty ``label_issues.csv`` (its header): none found, and not a file left from before."""
    columns = ["rank", "file", *(["class"] if multilabel else []), "given", "suggested", "score"]
    path = run / LABEL_ISSUES
    path.write_text(",".join(columns) + "\n")
    return path


def _log_cv_run(
    cfg: DictConfig, run: Path, summary: Mapping[str, Any], issues: Sequence[Mapping[str, Any]]
) -> None:
    """With W&B on: one more run in the folds' group, ``<name> cv``, holding the mean and std
    over folds of each metric and the likely label errors as a table with their pictures."""
    wandb = (cfg.get("logger") or {}).get("wandb")
    if wandb is None:
        return
    from hydra.utils import instantiate

    spec = copy.deepcopy(wandb)
    with open_dict(spec):
        spec.save_dir = str(run)
        spec.group = spec.get("group") or f"cv-{run.name}"
        spec.name = f"{spec.get('name') or 'train'} cv"
    loggers = [instantiate(spec)]
    numbers = {
        f"cv/{key}_{part}": value[part] for key, value in summary["cv"].items() for part in ("mean", "std")
    }
    log_results(loggers, {**numbers, "cv/label_issues": float(len(issues))})
    table = [{"image": r["file"], **{k: v for k, v in r.items() if k != "file"}, "file": r["file"]}
             for r in issues[: 2 * SHOWN_ISSUES]]  # fmt: skip
    log_table(loggers, "label_issues", table, images="image")
    if summary.get("label issues picture"):
        log_picture(loggers, "label_issues_grid", Path(summary["label issues picture"]))
    close_loggers(loggers, "success")


def mean_std(values: list[float]) -> str:
    """``0.9833 ± 0.0120``: mean and sample standard deviation."""
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def cv_summary(
    records: Sequence[Mapping[str, Any]], folds: int, oof: Path, final: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The cv run's summary: each metric as mean ± std, the per-fold values, the folders; with
    ``final`` (cv.refit=true) the refit's test numbers and checkpoint."""
    summary: dict[str, Any] = {"cross-validation": f"{folds} folds, stratified, seeded (data.seed)"}
    for key in SHOWN:
        values = [r["summary"][key] for r in records if key in r["summary"]]
        if len(values) == folds:
            summary[key] = mean_std(values)
            summary[f"{key} per fold"] = ", ".join(f"{v:.4f}" for v in values)
    summary["out-of-fold predictions"] = str(oof)
    summary["fold checkpoints"] = ", ".join(r["best checkpoint"] for r in records)
    if final is not None:
        summary["refit"] = "trained on every training+validation image, tested on the test split"
        for key in (k for k in SHOWN if k.startswith("test/") and k in final["summary"]):
            summary[f"refit {key}"] = final["summary"][key]
            if key in final.get("intervals", {}):
                summary[f"refit {key} 95 %"] = final["intervals"][key]
        summary["checkpoint (refit: for eval, predict, export)"] = final["best checkpoint"]
    summary["cv"] = {
        key: {"mean": statistics.fmean(v), "std": statistics.stdev(v), "folds": v}
        for key in SHOWN
        if len(v := [r["summary"][key] for r in records if key in r["summary"]]) == folds
    }
    return summary


def read_oof(run: Path, folds: int) -> tuple[OutOfFold, list[int], torch.Tensor | None]:
    """Every training+validation image's out-of-fold prediction, from the fold that validated
    on it (its ``fold_predictions.json``, read as data): the probabilities and targets, each
    image's fold, and the logits before the temperature (None if a fold's file has none)."""
    files: list[str] = []
    names: list[str] = []
    fold_of: list[int] = []
    targets, probs, logits = [], [], []
    for fold in range(folds):
        saved = read_test_predictions(fold_folder(run, fold) / FOLD_PREDICTIONS)
        if names and saved.class_names != names:
            raise UntrustedFileError(
                f"fold {fold} of {run} has other classes than fold 0: {saved.class_names}"
            )
        names = saved.class_names
        files += saved.files
        fold_of += [fold] * len(saved.files)
        targets.append(saved.targets)
        probs.append(saved.probs)
        logits.append(saved.logits)
    raw = None if any(z is None for z in logits) else torch.cat([z for z in logits if z is not None])
    return OutOfFold(files, names, torch.cat(targets), torch.cat(probs)), fold_of, raw


def oof_logits(run: Path, folds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The folds' out-of-fold logits (before any temperature) and targets, every fold's val
    images in turn: what cv.refit=true's run calibrates on."""
    oof, _, logits = read_oof(run, folds)
    if logits is None:
        raise UntrustedFileError(
            f"a fold of {run} wrote no logits in its {FOLD_PREDICTIONS} (written before cv.refit existed): "
            "delete that fold's folder to train it again, or set calibrate=false for the refit."
        )
    return logits.float(), oof.targets


def write_oof(run: Path, oof: OutOfFold, fold_of: Sequence[int]) -> Path:
    """``oof_predictions.csv``: ``file, label, fold, prob_<class> ...`` for every
    training+validation image, from the fold that validated on it (multi-label ``label``: the
    class names joined by a space)."""
    names = oof.class_names
    rows: list[list[Any]] = []
    for i, file in enumerate(oof.files):
        if oof.multilabel:
            label = " ".join(n for n, t in zip(names, oof.targets[i].tolist(), strict=True) if t)
        else:
            label = names[int(oof.targets[i])]
        rows.append([file, label, fold_of[i], *(f"{p:.6f}" for p in oof.probs[i].tolist())])
    path = run / OOF_FILE
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_row(["file", "label", "fold", *(f"prob_{n}" for n in names)]))
        writer.writerows(csv_row(row) for row in sorted(rows))
    return path
