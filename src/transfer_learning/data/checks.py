"""Checks on the split data, the same for every source: copies of training images in val/test
(leakage), one image under two labels (a labelling error), and class imbalance.

Each check reports what it found with the setting that acts on it; with
``data.drop_duplicates=true`` the copies are left out (and counted in ``left_out``). The
content hashes come from the decode scan, so nothing is checked without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from transfer_learning.data.datasets import samples, without

# A training set whose largest class has this many times the images of its smallest is imbalanced.
IMBALANCE_RATIO = 3.0
Warn = Callable[..., None]  # (message % args), logged once


def label_set(target: Any) -> tuple[int, ...]:
    """A sample's target as a sorted tuple of class indices (single- or multi-label)."""
    return tuple(sorted(target)) if isinstance(target, list | tuple) else (int(target),)


def _own_splits(datasets: dict[str, Dataset]) -> dict[str, Dataset]:
    """The splits, less ``test`` when it is the validation set itself."""
    test_is_val = "val" in datasets and datasets.get("test") is datasets["val"]
    return {name: ds for name, ds in datasets.items() if not (name == "test" and test_is_val)}


def check_labels(
    datasets: dict[str, Dataset], digests: Mapping[str, str], class_names: Sequence[str],
    drop: bool, warn: Warn, left_out: dict[str, int],
) -> None:  # fmt: skip
    """The same bytes under two labels (in any split) is a labelling error: one of the labels
    is wrong, and training learns both. Multi-label: the same bytes with two different label
    sets. Report the copies with their labels; ``drop`` leaves every copy out."""
    splits = _own_splits(datasets)
    by_content: dict[str, dict[tuple[int, ...], str]] = {}  # content hash -> label set -> its first file
    multilabel = False
    for dataset in splits.values():
        for file, target in zip(*samples(dataset), strict=True):
            multilabel |= isinstance(target, list)
            digest = digests.get(file)
            if digest is not None:
                by_content.setdefault(digest, {}).setdefault(label_set(target), file)
    mixed = {digest: labels for digest, labels in by_content.items() if len(labels) > 1}
    if not mixed:
        return
    pairs = "; ".join(
        " = ".join(
            f"{file} ({', '.join(class_names[i] for i in labels)})" for labels, file in sorted(found.items())
        )
        for found in list(mixed.values())[:5]
    )
    more = f" (and {len(mixed) - 5} more)" if len(mixed) > 5 else ""
    what = (
        "have two different label sets (the same bytes listed with different labels), so one of them is wrong"
        if multilabel
        else "are in two classes at once (the same bytes under two labels), so one of their labels is wrong"
    )
    if not drop:
        warn("Labelling: %d image(s) %s: %s%s. Fix the labels, or set data.drop_duplicates=true to leave "
             "every copy out.", len(mixed), what, pairs, more)  # fmt: skip
        return
    dropped = 0
    for name, dataset in splits.items():
        files, _ = samples(dataset)
        positions = {i for i, file in enumerate(files) if digests.get(file) in mixed}
        if positions:
            datasets[name] = without(dataset, positions)
            dropped += len(positions)
    if "test" not in splits:
        datasets["test"] = datasets["val"]
    reason = "same image with two label sets" if multilabel else "same image in two classes"
    left_out[reason] = dropped
    warn("Left %d image file(s) out: the %s (data.drop_duplicates=true): %s%s", dropped, reason, pairs, more)


def check_leakage(
    datasets: dict[str, Dataset], digests: Mapping[str, str], class_names: Sequence[str],
    drop: bool, warn: Warn, left_out: dict[str, int],
) -> None:  # fmt: skip
    """Validation or test images with the same bytes as a training image (copies, the same
    photo saved twice) make the scores look better than they are: report the pairs, and leave
    them out with ``drop``. First, the same bytes under two labels (:func:`check_labels`)."""
    if not digests:
        return  # no scan, no hashes
    check_labels(datasets, digests, class_names, drop, warn, left_out)
    train_files, _ = samples(datasets["train"])
    in_train = {digests[f]: f for f in train_files if f in digests}
    test_is_val = "val" in datasets and datasets.get("test") is datasets["val"]
    for name in ("val", "test"):
        dataset = datasets.get(name)
        if dataset is None or (name == "test" and test_is_val):
            continue
        files, _ = samples(dataset)
        leaks = [i for i, f in enumerate(files) if digests.get(f) in in_train]
        if not leaks:
            continue
        pairs = "; ".join(f"{files[i]} = {in_train[digests[files[i]]]}" for i in leaks[:5])
        more = f" (and {len(leaks) - 5} more)" if len(leaks) > 5 else ""
        if drop:
            datasets[name] = without(dataset, set(leaks))
            if name == "val" and test_is_val:
                datasets["test"] = datasets["val"]
            left_out[f"copy of a training image in {name}"] = len(leaks)
            warn("Left %d %s image(s) out: copies of training images: %s%s", len(leaks), name, pairs, more)
        else:
            warn(
                "Leakage: %d %s image(s) have the same content as a training image, so %s scores "
                "overstate accuracy: %s%s. Remove the copies, or set data.drop_duplicates=true.",
                len(leaks), name, name, pairs, more,
            )  # fmt: skip


def class_counts(targets: Sequence[Any], classes: int) -> list[int]:
    """Images of each class (multi-label: the images each class is on)."""
    counts = [0] * classes
    for target in targets:
        for label in label_set(target):
            counts[label] += 1
    return counts


def check_balance(
    counts: Sequence[int], class_names: Sequence[str], balance: str, task: str, warn: Warn
) -> None:
    """Report imbalanced classes (the largest :data:`IMBALANCE_RATIO` times the smallest or
    more) unless ``data.balance`` already acts on it."""
    low, high = min(counts), max(counts)
    if balance != "none" or low == 0 or high / low < IMBALANCE_RATIO:
        return
    fix = "weighted_loss (a positive weight per class)" if task == "multilabel" else "weighted_loss"
    warn(
        "Imbalanced classes: %s has %d training images, %s only %d (%.1fx). A classifier then favours the "
        "large classes; consider data.balance=%s or data.balance=weighted_sampler.",
        class_names[counts.index(high)], high, class_names[counts.index(low)], low, high / low, fix,
    )  # fmt: skip


def loss_weights(counts: Sequence[int], images: int, multilabel: bool) -> torch.Tensor:
    """Per-class weights of the training loss from the training class counts: inverse class
    frequency, 1 on average over the samples; multi-label, each class's ``pos_weight`` (its
    negatives over its positives among the ``images`` training images)."""
    positives = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    if multilabel:
        return (images - positives).clamp(min=0) / positives
    return positives.sum() / (len(positives) * positives)
