"""95 % intervals on headline numbers: the Wilson interval against its definition solved
another way; a real run's summary, summary.json and eval.json carrying every headline
metric's interval, the bootstrap ones checked against a loop over torchmetrics."""

from __future__ import annotations

import csv
import json
import math
import shutil
from statistics import NormalDist

import numpy as np
import pytest
import torch
from forkrun import run_python
from torchmetrics.functional.classification import multiclass_calibration_error, multiclass_f1_score

from helpers import REPO, best_checkpoint
from transfer_learning.results.confidence import RESAMPLES, SEED, format_interval, with_intervals
from transfer_learning.results.intervals import resample_indices, wilson


def by_inversion(k: int, n: int) -> tuple[float, float]:
    """The Wilson interval as its definition reads: every p whose score test |k/n - p| <=
    z sqrt(p (1 - p) / n) accepts, found by bisection on each side of k/n."""
    z = NormalDist().inv_cdf(0.975)
    accepts = lambda p: abs(k / n - p) <= z * math.sqrt(p * (1 - p) / n)  # noqa: E731

    def edge(inside: float, outside: float) -> float:
        for _ in range(200):
            middle = (inside + outside) / 2
            inside, outside = (middle, outside) if accepts(middle) else (inside, middle)
        return inside

    p = k / n
    low = 0.0 if k == 0 else edge(p, 0.0)
    high = 1.0 if k == n else edge(p, 1.0)
    return low, high


@pytest.mark.parametrize(("k", "n"), [(59, 60), (60, 60), (0, 60), (30, 60), (7, 13), (898, 900), (1, 2)])
def test_wilson_matches_the_score_test_inverted_numerically(k, n):
    low, high = wilson(k, n)
    assert (low, high) == pytest.approx(by_inversion(k, n), abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_on_the_numbers_the_readme_quotes_and_without_images():
    assert wilson(59, 60) == pytest.approx((0.9114, 0.9970), abs=1e-4)
    assert wilson(60, 60)[0] == pytest.approx(0.9398, abs=1e-4) and wilson(60, 60)[1] == 1.0
    assert all(math.isnan(v) for v in wilson(0, 0))
    narrow, wide = wilson(900, 1000), wilson(90, 100)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3


def test_each_interval_is_printed_under_its_number_and_its_bounds_are_numbers():
    summary = {"test/acc": 0.9833, "test/f1": 0.98, "calibration on test": "ECE ...", "test/ece": 0.02}
    found = {"test/acc": wilson(59, 60), "test/f1": (0.9, 1.0), "test/ece": (0.01, 0.08)}
    out = with_intervals(summary, found, 60, {"test/ece": "calibration on test"})
    assert list(out)[:7] == ["test/acc", "test/acc 95 %", "test/f1", "test/f1 95 %", "calibration on test",
                             "test/ece 95 %", "test/ece"]  # fmt: skip
    assert out["test/acc 95 %"] == "[0.911, 0.997] (Wilson, 60 images)"
    assert out["test/f1 95 %"] == "[0.900, 1.000] (bootstrap, 60 images)"
    assert out["test/ece_ci95_low"] == 0.01 and out["test/acc_ci95_high"] == wilson(59, 60)[1]


def by_loop(rows: list[dict[str, str]], names: list[str], metric) -> tuple[float, float]:
    """The percentile bootstrap the template promises, the slow way: the same seeded draws, the
    metric from torchmetrics on each resample, numpy's percentiles."""
    probs = torch.tensor([[float(r[n]) for n in names] for r in rows], dtype=torch.float64)
    targets = torch.tensor([names.index(r["true"]) for r in rows])
    values = [float(metric(probs[i], targets[i])) for i in resample_indices(len(rows), RESAMPLES, SEED)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


@pytest.mark.slow
def test_every_headline_number_of_a_run_and_of_eval_carries_its_interval(trained_run, tmp_path):
    """The run's summary (printed and summary.json) and eval.json on the same test split: accuracy
    (Wilson), macro F1 and ECE (bootstrap) with the same intervals, each against another
    computation: Wilson from the count right, the bootstrap by a loop over torchmetrics on eval's
    predictions.csv."""
    summary = json.loads((trained_run / "summary.json").read_text())
    test_images = int(summary["images train/val/test"].split("/")[2])
    right = round(summary["test/acc"] * test_images)
    assert (summary["test/acc_ci95_low"], summary["test/acc_ci95_high"]) == pytest.approx(
        wilson(right, test_images)
    )
    for key in ("test/acc", "test/f1", "test/ece"):
        bounds = [summary[f"{key}_ci95_low"], summary[f"{key}_ci95_high"]]
        how = "Wilson" if key == "test/acc" else "bootstrap"
        assert summary[f"{key} 95 %"] == format_interval(bounds, test_images, how)
        if key != "test/ece":  # ECE's bootstrap sits above it on few images (see confidence.py)
            assert bounds[0] <= summary[key] <= bounds[1], key
    keys = list(summary)
    assert keys.index("test/acc 95 %") == keys.index("test/acc") + 1  # printed under its number
    report = (trained_run / "report.md").read_text()  # the report's table: value, then interval
    for key in ("test/acc", "test/f1"):
        assert f"| {key} | {summary[key]:.4f} | {summary[key + ' 95 %']} |" in report, key
    assert f"- test ECE 95 % interval: {summary['test/ece 95 %']}" in report
    assert keys.index("test/f1 95 %") == keys.index("test/f1") + 1
    assert keys.index("test/ece 95 %") == keys.index("calibration on test") + 1

    work = tmp_path / "work"
    shutil.copytree(trained_run, work / "run")  # eval writes a threshold file beside the checkpoint
    result = run_python([REPO / "eval.py", f"ckpt_path={best_checkpoint(work / 'run')}",
                         f"hydra.run.dir={work}/eval", "data.num_workers=0"], cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((work / "eval" / "eval.json").read_text())
    assert evaluated["images"] == test_images
    for name, key in (("accuracy", "test/acc"), ("macro_f1", "test/f1"), ("ece", "test/ece")):
        assert evaluated[f"{name}_ci95"] == pytest.approx(
            [summary[f"{key}_ci95_low"], summary[f"{key}_ci95_high"]], abs=1e-4
        ), name
    assert f"macro F1   {evaluated['macro_f1']:.4f}  95 % [" in result.stdout
    assert "ECE 95 % [" in result.stdout
    with (work / "eval" / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    names = evaluated["class_names"]
    k = len(names)
    f1 = by_loop(rows, names, lambda p, t: multiclass_f1_score(p, t, num_classes=k, average="macro"))
    ece = by_loop(rows, names, lambda p, t: multiclass_calibration_error(p, t, num_classes=k, n_bins=15))
    assert evaluated["macro_f1_ci95"] == pytest.approx(f1, abs=1e-4)
    assert evaluated["ece_ci95"] == pytest.approx(ece, abs=1e-3)
