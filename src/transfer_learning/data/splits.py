"""The seeded split: the same images and labels give the same split for a seed, whatever order
a source lists them in (the data module sorts a listing first), and each class keeps its share
in every split.

Single-label data are split class by class (:func:`stratified_split`). Multi-label data use
iterative stratification (Sechidis, Tsoumakas and Vlahavas, "On the Stratification of
Multi-Label Data", ECML PKDD 2011; :func:`iterative_split`): the rarest label goes first, each
of its images into the split that still wants the most of that label; so rare labels are
spread before common ones use up the room. Ties are broken by the split's remaining room, then
at random (seeded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from transfer_learning.data.sources.base import Listing
from transfer_learning.errors import ConfigError, DataError


class TooFewToSplit(DataError):
    """A class has too few images to give every split one: ``label`` names it."""

    def __init__(self, message: str, label: int) -> None:
        super().__init__(message)
        self.label = label


def wanted(count: int, fraction: float) -> int:
    """Images of a class that a split with ``fraction`` gets: at least one, unless it is 0."""
    return max(1, round(count * fraction)) if fraction > 0 else 0


def too_few(
    label: int, count: int, fractions: Mapping[str, float], class_names: Sequence[str]
) -> TooFewToSplit:
    splits = [name for name, f in fractions.items() if f > 0]
    needed = 1 + len(splits)  # one image for train and one for each other split, whatever the fractions
    name = class_names[label]
    fewer = (
        f", or split less (data.{splits[-1]}_fraction=0 leaves out the {splits[-1]} split)"
        if count >= 2 and len(splits) > 1
        else ""
    )
    return TooFewToSplit(
        f"class {name!r} has only {count} image(s): train and {' and '.join(splits)} each need at least "
        f"one of every class, {needed} in all. Add {max(needed - count, 1)} more image(s) of {name!r}, "
        f"or leave the class out (remove its folder or rows){fewer}.",
        label,
    )


def stratified_split(
    labels: Sequence[int], fractions: Mapping[str, float], seed: int, class_names: Sequence[str]
) -> dict[str, list[int]]:
    """Indices per split; each class is shuffled with ``seed`` and cut by ``fractions``."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, list[int]] = {"train": [], **{name: [] for name in fractions}}
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    for label, indices in sorted(by_class.items()):
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator)]
        start = 0
        for name, fraction in fractions.items():
            count = wanted(len(order), fraction)
            out[name] += order[start : start + count]
            start += count
        if start >= len(order):
            raise too_few(label, len(order), fractions, class_names)
        out["train"] += order[start:]
    return {name: sorted(indices) for name, indices in out.items()}


def iterative_split(
    targets: Sequence[Sequence[int]], fractions: Mapping[str, float], seed: int, class_names: Sequence[str]
) -> dict[str, list[int]]:
    """Indices per split of multi-label ``targets`` (class indices per image), by iterative
    stratification. Each split wants :func:`wanted` positives of each class (train the rest),
    and ``fraction`` of all images; images without any label fill the splits' remaining room."""
    names = ["train", *fractions]
    rng = np.random.default_rng(seed)
    n, classes = len(targets), len(class_names)
    positives = np.zeros(classes, dtype=np.int64)
    for row in targets:
        positives[list(row)] += 1
    want = np.zeros((len(names), classes))  # split x class: positives still wanted
    for j, name in enumerate(names[1:], start=1):
        want[j] = [wanted(int(c), fractions[name]) for c in positives]
    want[0] = positives - want[1:].sum(axis=0)
    for short in np.flatnonzero((want[0] < 1) & (positives > 0)):
        raise too_few(int(short), int(positives[short]), fractions, class_names)
    room = np.array([n * (1 - sum(fractions.values())), *(n * fractions[k] for k in names[1:])])
    label_sets = [set(row) for row in targets]
    todo = set(rng.permutation(n).tolist())
    out: dict[str, list[int]] = {name: [] for name in names}

    def assign(i: int, j: int) -> None:
        out[names[j]].append(i)
        todo.discard(i)
        room[j] -= 1
        for label in targets[i]:
            want[j, label] -= 1

    remaining = positives.astype(np.float64)
    while todo:
        alive = remaining > 0
        if not alive.any():
            break
        label = int(np.flatnonzero(alive)[np.argmin(remaining[alive])])  # the rarest label left
        holders = sorted(i for i in todo if label in label_sets[i])
        for i in rng.permutation(holders).tolist():
            scores = np.stack([want[:, label], room], axis=1)
            best = np.flatnonzero(scores[:, 0] == scores[:, 0].max())
            best = best[room[best] == room[best].max()]
            assign(i, int(rng.choice(best)))
            for other in targets[i]:
                remaining[other] -= 1
    for i in rng.permutation(sorted(todo)).tolist():  # images without labels: where room is left
        best = np.flatnonzero(room == room.max())
        assign(i, int(rng.choice(best)))
    return {name: sorted(indices) for name, indices in out.items()}


def seeded_split(
    targets: Sequence[Sequence[int]],
    task: str,
    fractions: Mapping[str, float],
    seed: int,
    class_names: Sequence[str],
) -> dict[str, list[int]]:
    """Indices per split (``train`` and the splits of ``fractions``) for the listing's task."""
    if task == "multilabel":
        return iterative_split(targets, fractions, seed, class_names)
    return stratified_split([row[0] for row in targets], fractions, seed, class_names)


def split_deviation(
    targets: Sequence[Sequence[int]], split: Mapping[str, Sequence[int]], classes: int
) -> float:
    """The largest difference, over classes and splits, between a class's share of positives
    in a split and in the whole set: 0 for a perfectly stratified split."""

    def shares(indices: Sequence[int]) -> np.ndarray:
        counts = np.zeros(classes)
        for i in indices:
            counts[list(targets[i])] += 1
        return counts / max(1, len(indices))

    whole = shares(range(len(targets)))
    return float(max(np.abs(shares(indices) - whole).max() for indices in split.values() if len(indices)))


MAX_FOLDS = 10


def check_folds(folds: Any) -> int | None:
    """``cv.folds`` (``cv=K``): None, or a whole number from 2 to :data:`MAX_FOLDS`."""
    if folds is None:
        return None
    if isinstance(folds, bool) or not isinstance(folds, int) or not 2 <= folds <= MAX_FOLDS:
        raise ConfigError(
            f"cv.folds={folds!r}: k-fold cross-validation takes 2 to {MAX_FOLDS} folds (cv=5), or none "
            "(cv=none)."
        )
    return folds


def check_fractions(val_fraction: float, test_fraction: float) -> dict[str, float]:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: each must be "
            "in [0, 1) and together below 1."
        )
    return {"val": val_fraction, "test": test_fraction}


def split_listing(listing: Listing, fractions: Mapping[str, float], seed: int) -> dict[str, list[int]]:
    """Positions of ``listing``'s files per split: as listed, and what is missing (val; test
    too, when none is listed) split off the training files with :func:`seeded_split`."""
    given: dict[str, list[int]] = {}
    for i, name in enumerate(listing.splits or ["train"] * len(listing.files)):
        given.setdefault(name, []).append(i)
    if "train" not in given:
        raise DataError(f"{listing.where} lists no training images: mark some as train.")
    if "val" in given:
        return given
    wanted = {k: v for k, v in fractions.items() if k == "val" or "test" not in given}
    pool = given["train"]
    parts = seeded_split([listing.targets[i] for i in pool], listing.task, wanted, seed, listing.class_names)
    return {**given, **{name: [pool[j] for j in positions] for name, positions in parts.items()}}


def deal_folds(targets: Sequence[Sequence[int]], folds: int, seed: int) -> list[int]:
    """Each image's fold (0 .. ``folds`` - 1), by iterative stratification into equal folds: the
    rarest class still to deal goes first, each of its images into the fold that still wants the
    most of that class (each fold wants 1/folds of every class's positives, not rounded), ties to
    the fold with the most room, then at random (seeded). One label per image is the special
    case: every class dealt evenly, fold sizes within one image. Images without labels fill the
    folds with the most room."""
    rng = np.random.default_rng(seed)
    n = len(targets)
    classes = 1 + max((c for row in targets for c in row), default=-1)
    positives = np.zeros(classes)
    for row in targets:
        positives[list(row)] += 1
    want = np.tile(positives / folds, (folds, 1))
    room = np.full(folds, n / folds)
    out = [-1] * n
    todo = {i for i in range(n) if targets[i]}

    def place(i: int, candidates: np.ndarray) -> None:
        best = candidates[room[candidates] == room[candidates].max()]
        fold = int(rng.choice(best))
        out[i] = fold
        want[fold, list(targets[i])] -= 1
        room[fold] -= 1

    while todo:
        left = np.zeros(classes)
        for i in todo:
            left[list(targets[i])] += 1
        rarest = int(np.flatnonzero(left == left[left > 0].min())[0])
        for i in rng.permutation(sorted(i for i in todo if rarest in targets[i])).tolist():
            wants = want[:, rarest]
            place(i, np.flatnonzero(wants == wants.max()))
            todo.discard(i)
    for i in rng.permutation([i for i in range(n) if not targets[i]]).tolist():
        place(i, np.arange(folds))
    return out


REFIT = -1  # data.cv_fold of cv.refit=true's run: trained on every fold, no val


def fold_numbers(listing: Listing, fractions: Mapping[str, float], seed: int, folds: int) -> dict[int, int]:
    """k-fold cross-validation: each training+validation image's fold (listing position -> 0 ..
    ``folds`` - 1), dealt by :func:`deal_folds` so each fold keeps every class's share; the test
    split (listed, or cut off by ``fractions``) is left out, exactly as without folds. Every class
    needs at least ``folds`` training+validation images (one per fold)."""
    base = split_listing(listing, fractions, seed)
    pool = sorted(base["train"] + base.get("val", []))
    for label, name in enumerate(listing.class_names):
        have = sum(label in listing.targets[i] for i in pool)
        if 0 < have < folds:
            raise ConfigError(
                f"cv={folds}: class {name!r} has {have} training+validation image(s), and each of the "
                f"{folds} folds needs one. Use fewer folds (cv={max(2, have)}), add images of {name!r}, "
                "or leave the class out."
            )
    dealt = deal_folds([listing.targets[i] for i in pool], folds, seed)
    return {pool[j]: fold for j, fold in enumerate(dealt)}


def fold_split(
    listing: Listing, fractions: Mapping[str, float], seed: int, folds: int, fold: int
) -> dict[str, list[int]]:
    """Positions per split for fold ``fold`` of ``folds``: val is that fold, train the other folds,
    test the split that is held out without folds. ``fold`` = :data:`REFIT` (cv.refit=true):
    train is every fold, there is no val."""
    if not (0 <= fold < folds or fold == REFIT):
        raise ConfigError(f"data.cv_fold={fold}: a fold of {folds} is 0 to {folds - 1} ({REFIT}: the refit).")
    numbers = fold_numbers(listing, fractions, seed, folds)
    test = split_listing(listing, fractions, seed).get("test", [])
    out = {
        "train": sorted(i for i, k in numbers.items() if k != fold),
        "val": sorted(i for i, k in numbers.items() if k == fold),
        **({"test": test} if test else {}),
    }
    return {name: positions for name, positions in out.items() if positions}
