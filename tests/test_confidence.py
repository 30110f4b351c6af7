"""95 % intervals on headline numbers: the Wilson interval against its definition solved
another way, and a real run's summary and W&B-bound numbers carrying it."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import pytest

from transfer_learning.results.confidence import format_interval, share_intervals, wilson


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


def test_share_intervals_name_only_the_shares_and_format_reads_as_the_summary_prints():
    found = share_intervals({"test/acc": 0.9833, "test/f1": 0.98, "test/exact_match": None}, 60)
    assert list(found) == ["test/acc_ci95"] and found["test/acc_ci95"] == pytest.approx(list(wilson(59, 60)))
    assert format_interval(found["test/acc_ci95"], 60) == "[0.911, 0.997] (Wilson, 60 images)"


@pytest.mark.slow
def test_a_runs_summary_carries_the_test_accuracy_interval(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    test_images = int(summary["images train/val/test"].split("/")[2])
    right = round(summary["test/acc"] * test_images)
    low, high = wilson(right, test_images)
    assert (summary["test/acc_ci95_low"], summary["test/acc_ci95_high"]) == pytest.approx((low, high))
    assert summary["test/acc 95 %"] == format_interval([low, high], test_images)
    assert low <= summary["test/acc"] <= high
    keys = list(summary)
    assert keys.index("test/acc 95 %") == keys.index("test/acc") + 1  # printed under its number
