"""The images whose given label is probably wrong, from cross-validation's out-of-fold
probabilities (``cv=K``): ``label_issues.csv``, a picture grid, a W&B table, one summary line.

Each training+validation image is scored by the fold model that did not train on it, so a wrong
label is not learnt away. Confident learning (Northcutt et al., 2021, as cleanlab implements it:
``cleanlab.filter.find_label_issues``, pruning by the estimated noise rate between each pair of
classes) picks the images; they are ranked by self-confidence, the probability the model gives
the label they carry (lowest first: most likely wrong). Single-label: the suggested label is the
most probable class other than the given one. Multi-label: each (image, class) is its own
question, "is this class present?" (``cleanlab.multilabel_classification``): a row says which
class, the label set as given, and the set with that class flipped.

The probabilities are the folds' calibrated ones (each fold's temperature): confident learning
estimates per-class thresholds from them, and a sharper or softer model moves those thresholds
with it, so the calibration does not change which images are found much.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transfer_learning.results.image_grid import plot_image_grid

FILE = "label_issues.csv"
PICTURE = "label_issues.png"
SHOWN = 16  # images in the report's grid and the W&B table


@dataclass(frozen=True)
class OutOfFold:
    """Every training+validation image's out-of-fold probabilities and given label."""

    files: list[str]
    class_names: list[str]
    targets: torch.Tensor  # (N,) class indices; multi-label (N, C) 0/1
    probs: torch.Tensor  # (N, C) float64

    @property
    def multilabel(self) -> bool:
        return self.targets.ndim == 2


def find_label_issues(oof: OutOfFold) -> list[dict[str, Any]]:
    """The likely label errors, most likely first: ``rank, file, given, suggested, score``
    (multi-label: ``rank, file, class, given, suggested, score``); ``score`` is the probability
    of the label as given (0 to 1, low: probably wrong)."""
    import numpy as np
    from cleanlab.filter import find_label_issues as confident_learning
    from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class

    names = oof.class_names
    probs = oof.probs.double().clamp_min(0)
    rows: list[dict[str, Any]] = []
    if not oof.multilabel:
        probs = probs / probs.sum(1, keepdim=True)  # (rounded to 7 digits when written)
        labels = oof.targets.long()
        found = confident_learning(labels.numpy(), probs.numpy(), return_indices_ranked_by="self_confidence")
        for i in (int(i) for i in found):
            given = int(labels[i])
            others = probs[i].clone()
            others[given] = -1
            suggested = names[int(others.argmax())]
            rows.append({"file": oof.files[i], "given": names[given], "suggested": suggested,
                         "score": float(probs[i, given])})  # fmt: skip
    else:
        present = oof.targets.bool()
        sets = [[c for c in range(len(names)) if present[i, c]] for i in range(len(oof.files))]
        mask = find_multilabel_issues_per_class(sets, probs.clamp(0, 1).numpy())
        for i, c in np.argwhere(np.asarray(mask)).tolist():
            flipped = set(sets[i]) ^ {c}
            given_p = float(probs[i, c]) if present[i, c] else 1 - float(probs[i, c])
            rows.append({"file": oof.files[i], "class": names[c], "given": _label_set(sets[i], names),
                         "suggested": _label_set(sorted(flipped), names), "score": given_p})  # fmt: skip
        rows.sort(key=lambda r: r["score"])
    return [{"rank": k + 1, **row, "score": round(row["score"], 6)} for k, row in enumerate(rows)]


def _label_set(classes: Sequence[int], names: Sequence[str]) -> str:
    return " ".join(names[c] for c in classes) or "(none)"


def describe(rows: Sequence[dict[str, Any]], path: Path) -> str:
    """The summary's line: ``7 likely (<run>/label_issues.csv)``."""
    if rows and "class" in rows[0]:
        return f"{len(rows)} likely (image, class) pairs in {len({r['file'] for r in rows})} images ({path})"
    return f"{len(rows)} likely ({path})"


def plot_label_issues(rows: Sequence[dict[str, Any]], path: Path, limit: int = SHOWN) -> Path | None:
    """The most likely label errors in a grid, each with its given and suggested label and the
    score; None when there is none to draw."""
    captions = [
        (str(row["file"]), (f"class: {row['class']}\n" if "class" in row else "")
         + f"given: {row['given']}\nsuggested: {row['suggested']} ({float(row['score']):.2f})")
        for row in rows
    ]  # fmt: skip
    title = "Likely label errors (out-of-fold score of the given label)"
    return plot_image_grid(captions, title, path, limit)
