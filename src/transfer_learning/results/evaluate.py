"""Evaluate a checkpoint exactly, on one device: `python eval.py ckpt_path=... [data.root=...]`.

The data are the training run's own (its data settings are read from ``run_config.yaml`` in the
checkpoint's run folder, so ``split=test`` is the very test split the run made), with any
``data.*`` given on the command line on top; or ``data.root=<folder of class folders>
split=all`` for a held-out folder. Every image counts once (a plain loop on one device, no
distributed sampler), which is the exact-numbers path for runs trained with DDP.

Results: a table on the terminal and ``eval.json`` (accuracy, macro F1, per-class precision,
recall, F1 and support, the confusion matrix, the settings), ``confusion_matrix.png``,
``per_class_metrics.csv`` and ``predictions.csv`` in the eval folder; and
``<checkpoint>.threshold.json`` next to the checkpoint, the confidence threshold predict uses to
flag inputs unlike the training data (see :func:`confidence_threshold`).

A multi-label checkpoint (``task=multilabel``) is measured as its run's test was: macro mAP,
macro and micro F1 and exact match at the thresholds stored in the checkpoint (the same
functions, :mod:`transfer_learning.model.metrics`), per-class AP / precision / recall / F1 /
support in ``per_class_metrics.csv``, ``pr_curves.png``, and ``predictions.csv`` with the true
and predicted label sets (names joined by a space) and every class's probability.

The checkpoint holds its preprocessing, so eval takes the image size from it: ``input.*`` on the
command line (the training command's ``input.image_size=96``, repeated) must be the checkpoint's
own value, and then changes nothing; another value stops eval with the checkpoint's value
(:func:`check_input_settings`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset, Dataset

from transfer_learning.data.datamodule import ImageDataModule
from transfer_learning.data.datasets import samples
from transfer_learning.errors import ConfigError, DataError
from transfer_learning.model.metrics import classification_metrics
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.preprocessing import size_hints_off
from transfer_learning.readers import read_config
from transfer_learning.results.analysis import per_class_metrics, predict_probabilities, write_rows
from transfer_learning.results.calibration_report import before_after, evaluate_calibration, targets_tensor
from transfer_learning.results.confidence import format_interval, headline_intervals, method
from transfer_learning.results.multilabel import evaluate_multilabel, format_per_class
from transfer_learning.results.predict import threshold_file
from transfer_learning.results.reporting import save_confusion_matrix, save_confusion_table
from transfer_learning.run import registry
from transfer_learning.run.config import expand_path, expand_paths

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train", "all")
# predict flags an input whose top probability is below the threshold; eval sets it so that this
# share of the correctly classified evaluation images would be flagged.
FLAGGED_CORRECT_SHARE = 0.05
RUN_CONFIG = "run_config.yaml"


def confidence_threshold(confidence: torch.Tensor, correct: torch.Tensor) -> float | None:
    """A heuristic out-of-distribution signal: the maximum softmax probability below which only
    ``FLAGGED_CORRECT_SHARE`` of the correctly classified images fall. Inputs far from the
    training data often (not always) get a lower top probability than that."""
    right = confidence[correct]
    if len(right) == 0:
        return None
    return float(torch.quantile(right.double(), FLAGGED_CORRECT_SHARE))


def data_config(cfg: DictConfig, checkpoint: Path) -> tuple[dict[str, Any], Path | None]:
    """The training run's data settings (``run_config.yaml`` beside its ``checkpoints/``), with
    the ``data.*`` overrides of this command on top, and that file; the composed ``cfg.data``
    (and None) when the run left none or ``data=<group>`` was chosen on the command line."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    chosen_group = any(o.split("=", 1)[0].lstrip("+") == "data" for o in overrides)
    saved = checkpoint.parent.parent / RUN_CONFIG
    if chosen_group or not saved.is_file():
        if not chosen_group:
            log.info("No %s beside %s: using the data config given here", RUN_CONFIG, checkpoint.parent)
        return expand_paths(OmegaConf.to_container(cfg.data, resolve=True)), None
    fix = "Delete it, or pass data=<group> data.root=..."
    loaded = read_config(saved, fix=fix)
    if not isinstance(loaded.get("data"), dict):
        raise ConfigError(f"{saved} holds no data settings (a 'data:' mapping). {fix}")
    base = OmegaConf.create(loaded["data"])  # plain values: read_config refused interpolations
    mine = [o.lstrip("+") for o in overrides if o.lstrip("+").startswith("data.")]
    if mine:
        base = OmegaConf.merge(base, OmegaConf.from_dotlist(mine)["data"])
    log.info("Data settings of the training run (%s)%s", saved, f", with {mine}" if mine else "")
    return expand_paths(OmegaConf.to_container(base, resolve=True)), saved


def _command_line(prefix: str) -> dict[str, str]:
    """The ``<prefix><key>=<value>`` settings of this command (Hydra's record of it), as typed:
    key -> value text, the last one of a key winning; deletions (``~key``) left out."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    given: dict[str, str] = {}
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+")
        if key.startswith(prefix) and not override.startswith("~"):
            given[key.removeprefix(prefix)] = value
    return given


def _same(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)  # True is not 1 here


def check_input_settings(cfg: DictConfig, module: TransferLearningModule, checkpoint: Path) -> None:
    """``input.<key>=<value>`` on eval's command line (the training command's, repeated): the
    checkpoint holds its preprocessing, which eval never changes. A value the checkpoint was
    trained with changes nothing (one info line says so); any other is a ConfigError naming the
    checkpoint's value. ``input.image_size`` may be the size the training command asked for or
    the size the network takes (they differ where the one asked for did not apply)."""
    given = _command_line("input.")
    if not given:
        return
    crop = module.preprocessing.crop_size
    size, strict = module.hparams.get("image_size"), module.hparams.get("image_size_strict", True)
    if size is None:
        size_text = f"input.image_size=null (the weights' own size, {crop} px)"
    elif _same(size, crop):
        size_text = f"input.image_size={crop} ({crop} px)"
    else:
        size_text = f"input.image_size={size}, which this model could not take ({crop} px)"
    trained = {
        "image_size": (size, size_text),
        "image_size_strict": (strict, f"input.image_size_strict={str(strict).lower()} ({crop} px)"),
    }
    for key, text in given.items():
        if key not in trained:  # +input.<key>: conf/input/default.yaml has no such setting
            raise ConfigError(f"input.{key} is not a setting (input has: {', '.join(sorted(trained))}).")
        value = OmegaConf.select(cfg, f"input.{key}")  # as Hydra parsed it
        theirs, described = trained[key]
        # input.image_size: the size asked for, or the size the network takes; null where the one
        # asked for did not apply (the weights' own size was used)
        taken = (crop, *([None] if size is not None and not _same(size, crop) else []))
        if not (_same(value, theirs) or (key == "image_size" and any(_same(value, t) for t in taken))):
            raise ConfigError(
                f"input.{key}={text} contradicts the checkpoint {checkpoint.name}: eval takes the image "
                f"size from the checkpoint, trained with {described}. Drop input.{key}={text} from the "
                "command line."
            )
    settings = " ".join(f"input.{key}={text}" for key, text in given.items())
    log.info("%s: the checkpoint's own; eval takes the image size from it (%d px).", settings, crop)


def eval_dataset(datamodule: ImageDataModule, split: str) -> Dataset:
    """``split`` of the data module under the evaluation transform; ``all``: every image."""
    if split not in SPLITS:
        raise ConfigError(f"split={split}: one of {', '.join(SPLITS)}.")
    datasets = datamodule.eval_datasets()  # every split: evaluation transform
    if split != "all":
        if split not in datasets:  # e.g. val of cv.refit=true's checkpoint, trained on every fold
            there = ", ".join(name for name in ("train", "val", "test") if name in datasets)
            why = " (cv.refit=true trained this model on every training+validation image)"
            raise ConfigError(
                f"split={split}: this run has no {split} split{why if datamodule.refit else ''}; "
                f"it has {there} (or all)."
            )
        return datasets[split]
    parts = [datasets[name] for name in ("train", "val", "test") if name in datasets]
    unique = [p for i, p in enumerate(parts) if all(p is not q for q in parts[:i])]  # test may be val
    return ConcatDataset(unique)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python eval.py ckpt_path=<run>/checkpoints/<file>.ckpt")
    checkpoint = Path(expand_path(str(cfg.ckpt_path))).absolute()
    tta = str(cfg.get("tta") or "none")
    if tta not in ("none", "flip"):
        raise ConfigError(f"tta={tta}: none or flip.")
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    with size_hints_off():
        module = TransferLearningModule.load_for_inference(checkpoint, map_location=str(device))
    module = module.to(device)
    check_input_settings(cfg, module, checkpoint)  # before anything is written
    data, saved = data_config(cfg, checkpoint)
    for key in ("image_size", "image_size_strict"):
        data.pop(key, None)  # run_config.yaml from before the input group: the checkpoint decides
    # A run folder's file is data: its data module is built from the allow-list, never imported by
    # name. The checkpoint decides the task (a CSV with space-separated labels is multi-label).
    datamodule: ImageDataModule = (
        instantiate(data, task=module.task)
        if saved is None
        else registry.build("data", data, f"{saved} (data)", task=module.task)
    )
    names = datamodule.discover()
    where = datamodule.describe()
    unknown = sorted(set(names) - set(module.class_names))
    if unknown:
        raise DataError(
            f"{where} has classes the checkpoint does not know: {unknown}. Its classes: "
            f"{module.class_names}. Evaluate on data labelled with those classes."
        )
    datamodule.set_preprocessing(module.preprocessing)
    split = str(cfg.get("split") or "test")
    dataset = eval_dataset(datamodule, split)
    files, local = samples(dataset)
    if not files:
        raise DataError(f"the {split} split of {where} has no images.")
    # the checkpoint's class order (the data may name fewer classes, in another order)
    order = [module.class_names.index(name) for name in names]
    targets = [tuple(order[i] for i in t) if isinstance(t, tuple) else order[t] for t in local]
    batch_size = int(cfg.get("batch_size") or datamodule.batch_size)
    probs, kept = predict_probabilities(
        module, dataset, batch_size, datamodule.num_workers, tta=tta, progress=True
    )
    skipped = [files[i] for i in sorted(set(range(len(files))) - set(kept))]
    if skipped:  # data.on_bad_file=skip: files that broke after the scan count nowhere
        log.warning("Left out %d image(s) that could not be read: %s", len(skipped), ", ".join(skipped[:5]))
    files, targets = [files[i] for i in kept], [targets[i] for i in kept]
    if not files:
        raise DataError(f"no image of the {split} split of {where} could be read.")

    output = Path(str(cfg.paths.output_dir))
    output.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "data": where,
        "split": split,
        "images": len(files),
        "skipped": skipped,
        "tta": tta,
        "task": module.task,
        "class_names": module.class_names,
    }
    measure = evaluate_multilabel if module.task == "multilabel" else _multiclass
    result.update(measure(module, checkpoint, files, targets, probs, output, split))
    result.update(_intervals(module, probs, targets, result))
    result["calibration"], diagram = evaluate_calibration(probs, targets, module, output, split)
    result["files"]["reliability diagram"] = str(diagram)
    (output / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_result(result), flush=True)
    return result


def _multiclass(
    module: TransferLearningModule, checkpoint: Path, files: list[str], targets: list[Any],
    probs: torch.Tensor, output: Path, split: str,
) -> dict[str, Any]:  # fmt: skip
    """Accuracy, macro F1, the confusion matrix, per-class metrics, predictions.csv and the
    confidence threshold predict uses (``<checkpoint>.threshold.json``)."""
    names = module.class_names
    labels = torch.tensor(targets, dtype=torch.long)
    metrics = classification_metrics(len(names), "")
    metrics.update(probs, labels)
    scores = {k: float(v) for k, v in metrics.compute().items()}
    predicted = probs.argmax(1)
    matrix = torch.zeros(len(names), len(names), dtype=torch.long)
    matrix.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    per_class = per_class_metrics(matrix, names)
    confidence = probs.max(1).values
    threshold = confidence_threshold(confidence, predicted == labels)
    rows = [
        {"file": f, "true": names[int(t)], "predicted": names[int(p)], "confidence": float(c),
         **{name: float(v) for name, v in zip(names, row, strict=True)}}
        for f, t, p, c, row in zip(files, labels, predicted, confidence, probs, strict=True)
    ]  # fmt: skip
    picture = save_confusion_matrix(
        matrix, names, output / "confusion_matrix.png", title=f"Confusion matrix ({split})"
    )
    written = {
        "eval.json": str(output / "eval.json"),
        "confusion matrix": str(picture),
        "confusion counts": str(save_confusion_table(matrix, names, output / "confusion_matrix.csv")),
        "per-class metrics": str(write_rows(per_class, output / "per_class_metrics.csv")),
        "predictions": str(write_rows(rows, output / "predictions.csv")),
    }
    if threshold is not None:
        _write_threshold(checkpoint, threshold, output, split, written)
    return {
        "accuracy": scores["acc"],
        "macro_f1": scores["f1"],
        **({"top5_accuracy": scores["acc_top5"]} if "acc_top5" in scores else {}),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "max_softmax_threshold": threshold,
        "files": written,
    }


def _write_threshold(checkpoint: Path, threshold: float, output: Path, split: str, written: dict) -> None:
    """``<checkpoint>.threshold.json``: the confidence threshold predict flags inputs below."""
    note = {
        "max_softmax_threshold": threshold,
        "from": str(output / "eval.json"),
        "split": split,
        "meaning": f"{FLAGGED_CORRECT_SHARE:.0%} of the correctly classified {split} images have a "
        "lower top probability (a heuristic out-of-distribution signal)",
    }
    where = threshold_file(checkpoint)
    try:
        where.write_text(json.dumps(note, indent=2) + "\n")
        written["threshold"] = str(where)
    except OSError as exc:  # a read-only checkpoint folder: the threshold is still in eval.json
        log.warning("Could not write %s (%s); the threshold is in eval.json", where, exc)


# eval.json's names for the headline metrics (the run's: acc, f1, ...), by task
EVAL_NAMES = {"multiclass": {"acc": "accuracy", "f1": "macro_f1"}, "multilabel": {}}


def _intervals(
    module: TransferLearningModule, probs: torch.Tensor, targets: list[Any], result: Mapping[str, Any]
) -> dict[str, list[float]]:
    """``<metric>_ci95: [low, high]`` for accuracy, macro F1 and ECE (multi-label: mAP, F1, exact
    match, ECE) of these probabilities, at the thresholds the scores used: the run's intervals,
    computed the same way (:mod:`transfer_learning.results.confidence`)."""
    multilabel = module.task == "multilabel"
    truth = targets_tensor(targets, len(module.class_names), multilabel)
    thresholds = torch.tensor(result["thresholds"]) if multilabel else None
    names = EVAL_NAMES["multilabel" if multilabel else "multiclass"]
    found = headline_intervals(probs, truth, multilabel, thresholds)
    return {f"{names.get(metric, metric)}_ci95": list(bounds) for metric, bounds in found.items()}


def _bounds(result: Mapping[str, Any], key: str) -> str:
    how = method("acc" if key == "accuracy" else key)
    return format_interval(result[f"{key}_ci95"], result["images"], how)


def format_result(result: dict[str, Any]) -> str:
    width = max(8, *(len(r["class"]) for r in result["per_class"]))
    lines = [
        "=" * 72,
        f"  Evaluation of {result['checkpoint']}",
        f"  on {result['data']} ({result['split']}: {result['images']} images, tta={result['tta']})",
        *(
            [f"  left out {len(result['skipped'])} unreadable image(s) (listed in eval.json)"]
            if result["skipped"]
            else []
        ),
        "=" * 72,
    ]
    if result["task"] == "multilabel":
        lines += [
            f"  {name:<12} {result[key]:.4f}"
            + (f"  95 % {_bounds(result, key)}" if f"{key}_ci95" in result else "")
            for name, key in (
                ("mAP", "map"),
                ("macro F1", "f1"),
                ("micro F1", "f1_micro"),
                ("exact match", "exact_match"),
            )
        ]
        lines += ["", *format_per_class(result["per_class"])]  # fmt: skip
    else:
        lines += [f"  accuracy   {result['accuracy']:.4f}  95 % {_bounds(result, 'accuracy')}",
                  f"  macro F1   {result['macro_f1']:.4f}  95 % {_bounds(result, 'macro_f1')}"]  # fmt: skip
        if "top5_accuracy" in result:
            lines.append(f"  top-5 acc  {result['top5_accuracy']:.4f}")
        lines += ["", f"  {'class':<{width}}  precision  recall      f1  support"]
        for r in result["per_class"]:
            lines.append(f"  {r['class']:<{width}}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  "
                         f"{r['f1']:>6.4f}  {r['support']:>7}")  # fmt: skip
        if result["max_softmax_threshold"] is not None:
            lines += ["", f"  confidence threshold for predict: {result['max_softmax_threshold']:.4f}"]
    calibration = result["calibration"]
    lines += ["", f"  calibration (temperature {calibration['temperature']:.3f}; before -> after):",
              f"    {before_after(calibration['uncalibrated'], calibration['calibrated'])}",
              f"    ECE 95 % {_bounds(result, 'ece')}"]  # fmt: skip
    key_width = max(map(len, result["files"]))
    lines += [""] + [f"  {k:<{key_width}} {v}" for k, v in result["files"].items()] + ["=" * 72]
    return "\n".join(lines)
