"""How far a headline number on a small split could move: the 95 % intervals the run summary,
``summary.json``, W&B, eval, the report and the sweep table show.

On 60 test images an accuracy of 0.98 reads as 0.911-0.997: differences between runs smaller than
that are noise. Accuracy and multi-label exact match are shares of images right, so they get the
Wilson score interval (closed form; inside [0, 1] and not degenerate at 0 or n right). Macro F1,
mAP and ECE have no such form: a percentile bootstrap over the images, 1000 resamples from a fixed
seed, so the same predictions always give the same interval (a run's and eval's agree on the same
images). The arithmetic is in :mod:`transfer_learning.results.intervals`.

A bootstrap interval of ECE need not contain the ECE itself: ECE is biased upwards on few images
(every resample repeats some images, which empties bins), so its interval sits a little above.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from transfer_learning.results.intervals import intervals
from transfer_learning.results.point_metrics import Thresholds

LEVEL = 0.95
RESAMPLES = 1000
SEED = 0
EXACT = ("acc", "exact_match")  # Wilson; every other metric: bootstrap
BOUNDS = ("_ci95_low", "_ci95_high")  # summary.json and W&B: <metric>_ci95_low / _high


def headline_intervals(
    probs: Tensor, targets: Tensor, multilabel: bool, thresholds: Thresholds = None
) -> dict[str, tuple[float, float]]:
    """The 95 % interval of each headline metric of these (calibrated) probabilities: ``acc``,
    ``f1``, ``ece`` (single-label); ``exact_match``, ``map``, ``f1``, ``ece`` (multi-label, at the
    checkpoint's ``thresholds``). Keys as the run names its metrics (``test/<key>``)."""
    return intervals(probs, targets, multilabel, thresholds, seed=SEED, resamples=RESAMPLES, level=LEVEL)


def method(metric: str) -> str:
    """How ``metric``'s interval was found: ``Wilson`` or ``bootstrap``."""
    return "Wilson" if metric.rsplit("/", 1)[-1] in EXACT else "bootstrap"


def format_interval(bounds: tuple[float, float] | list[float], images: int, how: str = "Wilson") -> str:
    """``[0.911, 0.997] (Wilson, 60 images)``: a 95 % interval as printed."""
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}] ({how}, {images} images)"


def bound_numbers(prefix: str, found: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """``{prefix}{metric}_ci95_low`` / ``_high`` for every interval: the numbers summary.json and
    W&B carry."""
    out: dict[str, float] = {}
    for metric, (low, high) in found.items():
        out[f"{prefix}{metric}{BOUNDS[0]}"] = low
        out[f"{prefix}{metric}{BOUNDS[1]}"] = high
    return out


def with_intervals(
    summary: Mapping[str, Any],
    found: Mapping[str, tuple[float, float]],
    images: int,
    anchors: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``summary`` with ``<key> 95 %`` (printed) right after each ``<key>`` of ``found`` (or after
    the entry ``anchors`` names for it: the ECE sits under "calibration on test"), and the bounds
    as numbers at the end."""
    anchors = anchors or {}
    after: dict[str, list[str]] = {}
    for key in found:
        after.setdefault(anchors.get(key, key), []).append(key)
    out: dict[str, Any] = {}
    for entry, value in summary.items():
        out[entry] = value
        for key in after.get(entry, []):
            out[f"{key} 95 %"] = format_interval(found[key], images, method(key))
    out.update(bound_numbers("", found))
    return out
