"""The datasets every source ends in: image files with their targets, decoded on demand.

A target is one class index (multiclass) or a tuple of class indices (multilabel); a sample is
``(image tensor, target)``, the target as an int64 scalar or a float32 multi-hot vector.
A file that cannot be read any more during training follows ``data.on_bad_file``: a clear
error, or ``None`` in its place (sample and target left out together by
:func:`~transfer_learning.data.skipping.collate_present`; :attr:`ListedImages.skip_mask`
remembers it for the rest of the run).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from transfer_learning.data.images import load_rgb
from transfer_learning.data.skipping import SkipMask
from transfer_learning.errors import DataError

log = logging.getLogger(__name__)

Target = int | tuple[int, ...]


def encode(target: Target, num_classes: int, multilabel: bool) -> torch.Tensor:
    """A target as the loss wants it: an int64 scalar, or a float32 multi-hot vector."""
    if not multilabel:
        return torch.tensor(int(target))  # type: ignore[arg-type]
    hot = torch.zeros(num_classes, dtype=torch.float32)
    hot[list(target)] = 1.0  # type: ignore[arg-type]
    return hot


def multi_hot(targets: Sequence[Target], num_classes: int) -> list[tuple[int, ...]]:
    """Multi-label targets as 0/1 tuples of length ``num_classes`` (the feature cache's labels)."""
    out = []
    for target in targets:
        row = [0] * num_classes
        for c in target:  # type: ignore[union-attr]
            row[c] = 1
        out.append(tuple(row))
    return out


class ListedImages(Dataset):
    """``samples``: (file, target) pairs, in the order a source listed them (after splitting)."""

    def __init__(
        self,
        samples: Sequence[tuple[str, Target]],
        num_classes: int,
        multilabel: bool = False,
        transform: Callable[[Any], Any] | None = None,
        on_bad_file: str = "error",
        loader: Callable[[str], Any] = load_rgb,
    ) -> None:
        self.samples = [(str(f), t) for f, t in samples]
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.transform = transform
        self.on_bad_file = on_bad_file
        self.loader = loader
        self.skip_mask = SkipMask(len(self.samples))

    @property
    def targets(self) -> list[Target]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        if index in self.skip_mask:
            return None
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except DataError as exc:
            if self.on_bad_file != "skip":
                raise DataError(
                    f"{exc} (it passed the check before training: changed since?). Replace it, "
                    "or set data.on_bad_file=skip to train on without such files."
                ) from None
            self.skip_mask.mark(index)
            log.warning("Skipping %s (left out with its label for the rest of the run)", exc)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, encode(target, self.num_classes, self.multilabel)


class ClassFolder(ListedImages):
    """Single-label images given as class name -> files (the class order is the mapping's)."""

    def __init__(
        self, root: str, files: Mapping[str, Sequence[Path]], on_bad_file: str = "error", **kwargs: Any
    ):
        self.root = root
        self.classes = list(files)
        pairs = [(str(p), label) for label, paths in enumerate(files.values()) for p in paths]
        super().__init__(pairs, len(self.classes), on_bad_file=on_bad_file, **kwargs)


def without(dataset: Dataset, positions: set[int]) -> Subset:
    """``dataset`` less the samples at ``positions``: a Subset of the underlying dataset (never a
    Subset of a Subset, which :func:`samples` could not read)."""
    keep = [i for i in range(len(dataset)) if i not in positions]  # type: ignore[arg-type]
    if isinstance(dataset, Subset):
        return Subset(dataset.dataset, [dataset.indices[i] for i in keep])
    return Subset(dataset, keep)


def samples(dataset: Dataset) -> tuple[list[str], list[Any]]:
    """File paths and targets (an int, or a tuple of class indices for multi-label) of a
    :class:`ListedImages`, a Subset of one or a ConcatDataset of those, in dataset order."""
    if isinstance(dataset, ConcatDataset):
        parts = [samples(part) for part in dataset.datasets]
        return [f for files, _ in parts for f in files], [y for _, targets in parts for y in targets]
    if isinstance(dataset, Subset):
        base: Any = dataset.dataset
        pairs = [base.samples[i] for i in dataset.indices]
    else:
        pairs = list(dataset.samples)  # type: ignore[attr-defined]
    return [p for p, _ in pairs], [t if isinstance(t, tuple) else int(t) for _, t in pairs]
