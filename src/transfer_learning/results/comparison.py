"""Is the best sweep job's lead over the next one more than noise? A paired bootstrap on the test
images both jobs were scored on.

Two jobs of a sweep test on the same images (the split is seeded by the data, not by the job), so
their scores share the luck of which images are hard. Resampling the images once and scoring both
jobs on each resample cancels that shared part: the interval of the difference is much narrower
than the two jobs' own intervals side by side, and a lead whose interval contains 0 is inside the
noise of this test split.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from transfer_learning.readers import UntrustedFileError
from transfer_learning.results.confidence import LEVEL, RESAMPLES, SEED
from transfer_learning.results.intervals import paired_metric
from transfer_learning.results.point_metrics import per_image_metrics
from transfer_learning.results.test_predictions import FILE, TestPredictions, read_test_predictions


def _metrics(predictions: TestPredictions) -> dict[str, Any]:
    thresholds = None
    if predictions.multilabel:
        thresholds = torch.tensor(predictions.thresholds, dtype=torch.float64)
    return per_image_metrics(predictions.probs, predictions.targets, predictions.multilabel, thresholds)


def paired_lead(first: Path, second: Path, metric: str) -> dict[str, Any]:
    """The paired bootstrap of ``metric`` (``acc``, ``f1``, ``map``, ``exact_match``, ``ece``)
    between the runs in folders ``first`` and ``second``, from their ``test_predictions.json``.
    Returns ``difference``, ``low``, ``high``, ``p_better`` and ``images``; or ``why`` (text) where
    they cannot be compared."""
    try:
        a, b = read_test_predictions(first / FILE), read_test_predictions(second / FILE)
    except (OSError, UntrustedFileError) as exc:
        return {"why": f"no test predictions to compare ({exc})"}
    if a.files != b.files or a.task != b.task or a.class_names != b.class_names:
        return {"why": "they were tested on different images or classes"}
    if not bool((a.targets == b.targets).all()):
        return {"why": "their test images carry different labels"}
    ma, mb = _metrics(a), _metrics(b)
    if metric not in ma:
        return {"why": f"{metric} has no per-image form"}
    result = paired_metric(ma[metric], mb[metric], len(a.files), RESAMPLES, SEED, LEVEL)
    return {**result, "images": len(a.files)}


def describe_lead(best: Mapping[str, Any], runner_up: Mapping[str, Any], test_key: str) -> str:
    """One line for the sweep summary: the best job's lead over the next on ``test_key``
    (``test/acc``), its paired 95 % interval, and whether it is inside the noise."""
    metric = test_key.removeprefix("test/")
    found = paired_lead(Path(str(best["output_dir"])), Path(str(runner_up["output_dir"])), metric)
    head = f"lead of job {best['job']} over job {runner_up['job']} on {test_key}"
    if "why" in found:
        return f"{head}: not compared, {found['why']}"
    low, high, diff = found["low"], found["high"], found["difference"]
    inside = low <= 0 <= high
    if inside:
        verdict = "inside the noise: the test split cannot tell these two apart"
    else:
        better = (diff < 0) == (metric == "ece")  # ECE: lower is better
        verdict = "outside the noise" if better else "outside the noise, in the runner-up's favour"
    return (
        f"{head}: {diff:+.4f}, 95 % [{low:+.3f}, {high:+.3f}] (paired bootstrap, {found['images']} "
        f"test images): {verdict}"
    )
