"""What a finished run is measured by beyond the headline metrics: parameter counts and batch
sizes, per-class precision/recall/F1, and the validation images the model gets most wrong."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from transfer_learning.data.datamodule import ImageDataModule
from transfer_learning.data.skipping import collate_present, kept_positions
from transfer_learning.features import CachedFeatures
from transfer_learning.model.module import TransferLearningModule


def run_facts(module: TransferLearningModule, datamodule: ImageDataModule, trainer: L.Trainer) -> dict:
    """Parameter counts (what the strategy trains) and the batch arithmetic of this run."""
    params = list(module.net.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    processes = trainer.num_devices * trainer.num_nodes
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    return {
        "params/total": total,
        "params/trainable": trainable,
        "params/frozen": total - trainable,
        "batch/per_device": (batch := datamodule.train_batch_size(processes)),
        "batch/effective": batch * processes * accumulate,
        "batch/cached_features": datamodule.feature_cache is not None,
        "devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
        "accumulate_grad_batches": accumulate,
    }


def per_class_metrics(matrix: torch.Tensor, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class, from a confusion matrix (true classes
    down, predicted across). A class never predicted has precision 0; never present, recall 0."""
    counts = matrix.detach().cpu().double()
    hits = counts.diag()
    predicted, support = counts.sum(dim=0), counts.sum(dim=1)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), torch.zeros_like(hits))
    recall = torch.where(support > 0, hits / support.clamp(min=1), torch.zeros_like(hits))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-12), 0.0)
    return [
        {
            "class": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]


def write_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """A list of same-keyed dicts as CSV; text cells that a spreadsheet would run as a formula
    (a class named ``=HYPERLINK(...)``) get a leading ``'``, numbers stay numbers."""
    from transfer_learning.escaping import csv_dict  # here: only this function of the module writes CSV

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(csv_dict(dict(row)) for row in rows)
    return path


@torch.inference_mode()
def _outputs(
    module: TransferLearningModule,
    dataset: Dataset,
    batch_size: int,
    workers: int,
    output: Callable[[torch.Tensor], torch.Tensor],
    progress: bool,
) -> tuple[torch.Tensor, list[int]]:
    """``output(batch)`` of every readable sample of ``dataset`` in order, on this process alone,
    with the module in eval mode, and the positions of those samples (a file that cannot be read
    any more under ``data.on_bad_file=skip`` is left out, label and all)."""
    from tqdm.auto import tqdm

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_present
    )
    was_training = module.training
    module.eval()
    out = []
    for batch in tqdm(loader, desc="Evaluating", leave=False, disable=not progress):
        if batch is None:  # every file of the batch skipped
            continue
        out.append(output(batch[0].to(module.device)).float().cpu())
    module.train(was_training)
    values = torch.cat(out) if out else torch.empty(0, len(module.class_names))
    kept = kept_positions(dataset)
    assert len(kept) == len(values), (len(kept), len(values))
    return values, kept


def predict_probabilities(
    module: TransferLearningModule,
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    tta: str = "none",
    progress: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """Class probabilities (softmax; multi-label: a sigmoid per class; calibrated by the
    module's temperature) of every readable sample of ``dataset`` (see :func:`_outputs`).
    ``tta="flip"`` averages each image's probabilities with its horizontally flipped copy's
    (images only, not cached features)."""

    def output(x: torch.Tensor) -> torch.Tensor:
        probs = module.probabilities(module(x))
        if tta == "flip":
            probs = (probs + module.probabilities(module(x.flip(-1)))) / 2
        return probs

    return _outputs(module, dataset, batch_size, workers, output, progress)


def predict_logits(
    module: TransferLearningModule, datamodule: ImageDataModule, split: str
) -> tuple[torch.Tensor, list[Any], list[str]]:
    """The raw logits (before any temperature) of every readable sample of ``split``, their
    targets and their files, on this process alone (cached features when the run used them)."""
    dataset = datamodule.datasets[split]
    workers = 0 if isinstance(dataset, CachedFeatures) else datamodule.num_workers
    logits, kept = _outputs(module, dataset, max(datamodule.batch_size, 64), workers, module, False)
    files, labels = datamodule.split_files[split]
    return logits, [labels[i] for i in kept], [files[i] for i in kept]


def predict_split(
    module: TransferLearningModule, datamodule: ImageDataModule, split: str
) -> tuple[list[str], list[Any], torch.Tensor]:
    """Files, targets (a class index; multi-label: a tuple of them) and class probabilities of
    every readable sample of ``split`` in dataset order, on this process alone (cached features
    when the run used them, else the evaluation transform of each image)."""
    dataset = datamodule.datasets[split]
    workers = 0 if isinstance(dataset, CachedFeatures) else datamodule.num_workers
    probs, kept = predict_probabilities(module, dataset, max(datamodule.batch_size, 64), workers)
    files, labels = datamodule.split_files[split]
    return [files[i] for i in kept], [labels[i] for i in kept], probs


def worst_samples(
    files: Sequence[str], labels: Sequence[int], probs: torch.Tensor, class_names: Sequence[str], limit: int
) -> list[dict[str, Any]]:
    """Samples ordered worst first: lowest probability given to the true class (so confident
    mistakes lead), at most ``limit`` of them."""
    if limit <= 0 or len(files) == 0:
        return []
    true = torch.as_tensor(list(labels))
    p_true = probs[torch.arange(len(true)), true]
    confidence, predicted = probs.max(dim=1)
    rows = []
    for i in torch.argsort(p_true)[:limit].tolist():
        rows.append(
            {
                "file": files[i],
                "true": class_names[int(true[i])],
                "predicted": class_names[int(predicted[i])],
                "confidence": float(confidence[i]),
                "p_true": float(p_true[i]),
                "correct": bool(predicted[i] == true[i]),
            }
        )
    return rows
