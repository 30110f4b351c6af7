"""Files that break after the scan, left out together with their labels.

With ``data.on_bad_file=skip`` a dataset returns ``None`` for a file it cannot decode any more,
and marks its index in a :class:`SkipMask`: a flag per sample in shared memory, so a mark made
in a loader worker process is seen by the main process (how the run counts what it left out,
and how code that keeps outputs in dataset order learns which positions are missing).
:func:`collate_present` drops the ``None`` samples from a batch, so an image is never replaced
by another under its label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, default_collate


class SkipMask:
    """One flag per sample of a dataset, set when that sample's file was skipped."""

    def __init__(self, size: int) -> None:
        self.flags = torch.zeros(size, dtype=torch.bool).share_memory_()

    def mark(self, index: int) -> None:
        self.flags[index] = True

    def __contains__(self, index: int) -> bool:
        return bool(self.flags[index])

    def count(self) -> int:
        return int(self.flags.sum())


def collate_present(batch: Sequence[Any]) -> Any:
    """``default_collate`` of the samples that are there; ``None`` when none is."""
    present = [sample for sample in batch if sample is not None]
    return default_collate(present) if present else None


def skipped_positions(dataset: Dataset) -> list[int]:
    """Positions (in ``dataset`` order) of the samples skipped so far: a dataset with a
    ``skip_mask``, a ``Subset`` of one, or a ``ConcatDataset`` of those."""
    if isinstance(dataset, ConcatDataset):
        out, offset = [], 0
        for part in dataset.datasets:
            out += [offset + i for i in skipped_positions(part)]
            offset += len(part)  # type: ignore[arg-type]
        return out
    if isinstance(dataset, Subset):
        mask = getattr(dataset.dataset, "skip_mask", None)
        return [] if mask is None else [i for i, j in enumerate(dataset.indices) if j in mask]
    mask = getattr(dataset, "skip_mask", None)
    return [] if mask is None else torch.nonzero(mask.flags).flatten().tolist()


def kept_positions(dataset: Dataset) -> list[int]:
    """Positions of the samples not skipped so far, in order."""
    skipped = set(skipped_positions(dataset))
    return [i for i in range(len(dataset)) if i not in skipped]  # type: ignore[arg-type]


def gather_sets(local: dict[str, set[str]]) -> dict[str, set[str]]:
    """The union, over every process of a DDP run, of each process's ``local`` name -> set."""
    merged = {name: set(items) for name, items in local.items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, merged)
        for other in everyone:
            for name, items in other.items():
                merged.setdefault(name, set()).update(items)
    return merged
