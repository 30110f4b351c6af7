"""transfer_learning.results.intervals: every interval and metric checked against a second,
independent computation (a closed form written out here, torchmetrics, scikit-learn, or the
slow per-resample loop)."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
    multiclass_f1_score,
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
)

from transfer_learning.results.intervals import (
    bootstrap,
    intervals,
    paired_accuracy,
    paired_bootstrap,
    resample_indices,
    wilson,
)
from transfer_learning.results.point_metrics import (
    accuracy,
    ece,
    exact_match,
    macro_f1,
    mean_average_precision,
    multilabel_macro_f1,
    point_values,
)


def single(n: int, classes: int = 5, seed: int = 0, skill: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, classes) softmax probabilities and (n,) targets, every class present when n >= classes;
    ``skill`` raises the true class's logit."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % classes
    targets = targets[torch.randperm(n, generator=g)]
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), targets] += skill
    return torch.softmax(logits, 1), targets


def multi(n: int, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, classes) probabilities and 0/1 targets, every class with a positive and a negative."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, classes, generator=g) < 0.4).long()
    targets[0], targets[1] = 1, 0
    probs = (0.35 * targets + 0.65 * torch.rand(n, classes, generator=g)).clamp(0, 1)
    return probs, targets


# ----------------------------------------------------------------------------- Wilson


def wilson_by_quadratic(k: int, n: int, level: float) -> tuple[float, float]:
    """The Wilson bounds as the roots in p of (k/n - p)^2 = z^2 p (1 - p) / n."""
    z2 = NormalDist().inv_cdf((1 + level) / 2) ** 2
    phat = k / n
    a, b, c = 1 + z2 / n, -(2 * phat + z2 / n), phat * phat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize(("k", "n"), [(0, 7), (1, 7), (30, 60), (59, 60), (60, 60), (17, 123)])
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_wilson_matches_the_quadratic_roots(k: int, n: int, level: float) -> None:
    low, high = wilson(k, n, level)
    want_low, want_high = wilson_by_quadratic(k, n, level)
    assert low == pytest.approx(max(0.0, want_low), abs=1e-12)
    assert high == pytest.approx(min(1.0, want_high), abs=1e-12)
    assert (low == 0.0) == (k == 0) and (high == 1.0) == (k == n)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_known_values() -> None:
    # 59/60 at 95 %: centre 0.954298, half-width 0.042752.
    low, high = wilson(59, 60)
    assert low == pytest.approx(0.91145, abs=1e-3)
    assert high == pytest.approx(0.99705, abs=1e-3)
    # 0/10 and 10/10: the textbook (0, 0.2775) and its mirror, touching the ends exactly.
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    # Wider at a higher level.
    assert wilson(59, 60, 0.99)[0] < low


def test_wilson_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        wilson(5, 4)
    with pytest.raises(ValueError):
        wilson(1, 4, level=1.0)


# ----------------------------------------------------------------------------- metrics vs torchmetrics


def test_single_label_metrics_match_torchmetrics() -> None:
    probs, targets = single(90, classes=6, seed=3)
    assert accuracy(probs, targets) == pytest.approx(float((probs.argmax(1) == targets).double().mean()))
    want_f1 = float(multiclass_f1_score(probs, targets, num_classes=6, average="macro"))
    assert macro_f1(probs, targets, 6) == pytest.approx(want_f1, abs=1e-6)
    want_ece = float(multiclass_calibration_error(probs, targets, num_classes=6, n_bins=15, norm="l1"))
    assert ece(probs, targets, multilabel=False) == pytest.approx(want_ece, abs=1e-6)


def test_macro_f1_skips_classes_nobody_saw_like_torchmetrics() -> None:
    # Class 3 is neither a target nor predicted: torchmetrics leaves it out of the macro mean too.
    probs = torch.tensor([[0.9, 0.05, 0.03, 0.02], [0.1, 0.8, 0.05, 0.05], [0.2, 0.2, 0.5, 0.1]])
    targets = torch.tensor([0, 1, 1])
    want = float(multiclass_f1_score(probs, targets, num_classes=4, average="macro"))
    assert macro_f1(probs, targets, 4) == pytest.approx(want, abs=1e-6)
    assert macro_f1(probs, targets, 4) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_multilabel_macro_f1_counts_an_absent_class_as_zero_like_the_run() -> None:
    """Multi-label: a class nobody has and nobody calls scores 0 in the mean, as the run's own
    test/f1 (model.metrics.multilabel_scores) and torchmetrics' multilabel F1 count it, so the
    interval is about the number the summary prints."""
    from transfer_learning.model.metrics import multilabel_scores

    probs, targets = multi(30, classes=4, seed=21)
    probs[:, 3], targets[:, 3] = 0.1, 0  # never positive, never called
    thresholds = torch.full((4,), 0.5)
    run = multilabel_scores(probs, targets, thresholds)["f1"]
    want = float(multilabel_f1_score(probs, targets, num_labels=4, threshold=0.5, average="macro"))
    assert multilabel_macro_f1(probs, targets) == pytest.approx(run, abs=1e-9)
    assert run == pytest.approx(want, abs=1e-6)
    assert point_values(probs, targets, multilabel=True, thresholds=thresholds)["f1"] == pytest.approx(run)


def test_multilabel_metrics_match_torchmetrics() -> None:
    probs, targets = multi(80, classes=5, seed=4)
    want_map = float(multilabel_average_precision(probs, targets, num_labels=5, average="macro"))
    assert mean_average_precision(probs, targets) == pytest.approx(want_map, abs=1e-6)
    want_ece = float(binary_calibration_error(probs.flatten(), targets.flatten(), n_bins=15, norm="l1"))
    assert ece(probs, targets, multilabel=True) == pytest.approx(want_ece, abs=1e-6)
    # No probability sits exactly on a threshold, so torchmetrics' ">" and our ">=" agree.
    thresholds = torch.tensor([0.5, 0.4, 0.6, 0.55, 0.45])
    want_f1 = float(multilabel_f1_score(probs, targets, num_labels=5, threshold=0.5, average="macro"))
    assert multilabel_macro_f1(probs, targets) == pytest.approx(want_f1, abs=1e-6)
    want_exact = float(multilabel_exact_match(probs, targets, num_labels=5))
    assert exact_match(probs, targets) == pytest.approx(want_exact, abs=1e-6)
    called = probs >= thresholds
    assert exact_match(probs, targets, thresholds) == pytest.approx(
        float((called == targets.bool()).all(1).double().mean())
    )


def test_average_precision_groups_tied_scores_like_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    probs, targets = multi(60, classes=4, seed=5)
    probs = (probs * 4).round() / 4  # five distinct scores: many ties
    want = sum(metrics.average_precision_score(targets[:, c], probs[:, c]) for c in range(4)) / 4
    assert mean_average_precision(probs, targets) == pytest.approx(want, abs=1e-9)
    # A class without positives is left out of the mean.
    targets[:, 3] = 0
    want = sum(metrics.average_precision_score(targets[:, c], probs[:, c]) for c in range(3)) / 3
    assert mean_average_precision(probs, targets) == pytest.approx(want, abs=1e-9)


def test_ece_matches_torchmetrics_on_bin_edges_and_certainty() -> None:
    # Confidences on the bin boundaries (k / 15) and at exactly 1, where bucketing is delicate.
    g = torch.Generator().manual_seed(6)
    edges = torch.randint(0, 16, (200,), generator=g).float() / 15
    targets = (torch.rand(200, generator=g) < edges).long()
    want = float(binary_calibration_error(edges, targets, n_bins=15, norm="l1"))
    assert ece(edges[:, None], targets[:, None], multilabel=True) == pytest.approx(want, abs=1e-6)
    probs, labels = single(150, classes=3, seed=7, skill=6.0)
    probs[:10] = torch.tensor([1.0, 0.0, 0.0])
    want = float(multiclass_calibration_error(probs, labels, num_classes=3, n_bins=15, norm="l1"))
    assert ece(probs, labels, multilabel=False) == pytest.approx(want, abs=1e-6)
    for bins in (5, 10):
        want = float(multiclass_calibration_error(probs, labels, num_classes=3, n_bins=bins, norm="l1"))
        assert ece(probs, labels, multilabel=False, bins=bins) == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------- bootstrap


def test_vectorised_intervals_equal_the_per_resample_loop() -> None:
    probs, targets = single(40, classes=4, seed=8)
    fast = intervals(probs, targets, multilabel=False, seed=3, resamples=300)
    slow_f1 = bootstrap(lambda i: macro_f1(probs[i], targets[i], 4), 40, resamples=300, seed=3)
    slow_ece = bootstrap(lambda i: ece(probs[i], targets[i], False), 40, resamples=300, seed=3)
    assert fast["f1"] == pytest.approx(slow_f1, abs=1e-12)
    assert fast["ece"] == pytest.approx(slow_ece, abs=1e-9)

    probs, targets = multi(40, classes=4, seed=9)
    thresholds = torch.tensor([0.5, 0.6, 0.4, 0.5])
    fast = intervals(probs, targets, multilabel=True, thresholds=thresholds, seed=4, resamples=300)
    slow = {
        "map": bootstrap(lambda i: mean_average_precision(probs[i], targets[i]), 40, 300, 4),
        "f1": bootstrap(lambda i: multilabel_macro_f1(probs[i], targets[i], thresholds), 40, 300, 4),
        "ece": bootstrap(lambda i: ece(probs[i], targets[i], True), 40, 300, 4),
    }
    for name, want in slow.items():
        assert fast[name] == pytest.approx(want, abs=1e-9), name


def test_bootstrap_of_accuracy_agrees_with_wilson() -> None:
    probs, targets = single(200, classes=5, seed=10, skill=1.5)
    correct = int((probs.argmax(1) == targets).sum())
    assert 0.4 < correct / 200 < 0.9
    boot = bootstrap(lambda i: accuracy(probs[i], targets[i]), 200, resamples=2000, seed=1)
    exact = wilson(correct, 200)
    assert intervals(probs, targets, multilabel=False)["acc"] == exact
    assert boot[0] == pytest.approx(exact[0], abs=0.03)
    assert boot[1] == pytest.approx(exact[1], abs=0.03)


def test_same_seed_same_interval_other_seed_other_interval() -> None:
    for probs, targets, multilabel in ((*single(60, seed=11), False), (*multi(60, seed=12), True)):
        first = intervals(probs, targets, multilabel, seed=5, resamples=200)
        assert intervals(probs, targets, multilabel, seed=5, resamples=200) == first
        other = intervals(probs, targets, multilabel, seed=6, resamples=200)
        assert other["f1"] != first["f1"]
        assert other["ece"] != first["ece"]
    assert torch.equal(resample_indices(30, 10, seed=2), resample_indices(30, 10, seed=2))


def test_points_lie_inside_their_intervals() -> None:
    for probs, targets, multilabel in ((*single(70, seed=13), False), (*multi(70, seed=14), True)):
        points = point_values(probs, targets, multilabel)
        found = intervals(probs, targets, multilabel, resamples=500)
        assert points.keys() == found.keys()
        for name, (low, high) in found.items():
            assert low <= points[name] <= high, name
    assert set(point_values(*multi(10), multilabel=True)) == {"exact_match", "map", "f1", "ece"}
    assert set(point_values(*single(10), multilabel=False)) == {"acc", "f1", "ece"}


def test_intervals_narrow_as_the_test_set_grows() -> None:
    def widths(n: int, multilabel: bool) -> dict[str, float]:
        probs, targets = multi(n, seed=15) if multilabel else single(n, seed=15, skill=1.5)
        found = intervals(probs, targets, multilabel, resamples=400)
        return {name: high - low for name, (low, high) in found.items()}

    for multilabel in (False, True):
        small, large = widths(50, multilabel), widths(800, multilabel)
        for name in small:
            # Widths shrink like 1 / sqrt(n): 16x the images, about a quarter of the width.
            assert large[name] < 0.6 * small[name], (multilabel, name, small[name], large[name])


def test_no_images_gives_nan() -> None:
    for low, high in (wilson(0, 0), bootstrap(lambda i: 1.0, 0)):
        assert math.isnan(low) and math.isnan(high)
    empty = intervals(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), multilabel=False)
    assert set(empty) == {"acc", "f1", "ece"}
    assert all(math.isnan(v) for pair in empty.values() for v in pair)
    empty = intervals(torch.zeros(0, 3), torch.zeros(0, 3), multilabel=True)
    assert all(math.isnan(v) for pair in empty.values() for v in pair)
    assert all(math.isnan(v) for v in point_values(torch.zeros(0, 3), torch.zeros(0, 3), True).values())
    assert all(math.isnan(v) for v in paired_accuracy(torch.zeros(0), torch.zeros(0)).values())
    assert all(math.isnan(v) for v in paired_bootstrap(lambda i: 1.0, lambda i: 1.0, 0).values())


def test_nan_resamples_are_dropped() -> None:
    # One positive in 30 images: about a third of the resamples miss it, and their AP is NaN.
    probs, targets = torch.rand(30, 1, generator=torch.Generator().manual_seed(16)), torch.zeros(30, 1)
    targets[0] = 1
    low, high = intervals(probs, targets, multilabel=True, resamples=300)["map"]
    assert 0.0 < low <= high <= 1.0


# ----------------------------------------------------------------------------- paired comparisons


def test_identical_models_differ_by_nothing() -> None:
    correct = torch.arange(60) % 3 != 0
    result = paired_accuracy(correct, correct)
    assert result == {"difference": 0.0, "low": 0.0, "high": 0.0, "p_better": 0.0}


def test_ten_extra_right_answers_out_of_sixty_are_outside_the_noise() -> None:
    a = torch.zeros(60, dtype=torch.bool)
    a[:40] = True
    b = a.clone()
    b[40:50] = True  # B: A's 40 right answers and 10 more
    result = paired_accuracy(b, a)
    assert result["difference"] == pytest.approx(10 / 60)
    # A - B is 0 on a resample only if it misses all ten images: (50/60)^60, about 2e-5.
    assert 0 < result["low"] < result["difference"] < result["high"]
    assert result["p_better"] == 1.0
    # Unpaired, the two Wilson intervals (40/60 and 50/60) overlap: pairing is what separates them.
    assert wilson(50, 60)[0] < wilson(40, 60)[1]


def test_a_lead_with_as_many_losses_is_inside_the_noise() -> None:
    a = torch.zeros(60, dtype=torch.bool)
    a[:45] = True
    b = a.clone()
    b[:7] = False  # B loses 7 images A gets right...
    b[45:50] = True  # ...and wins 5 that A gets wrong: A leads by 2 of 60.
    result = paired_accuracy(a, b)
    assert result["difference"] == pytest.approx(2 / 60)
    assert result["low"] < 0 < result["high"]
    assert 0.5 < result["p_better"] < 0.95


def test_paired_bootstrap_equals_paired_accuracy() -> None:
    probs_a, targets = single(50, seed=17, skill=2.0)
    probs_b, _ = single(50, seed=18, skill=1.0)  # another model: its noise is not A's
    correct_a, correct_b = probs_a.argmax(1) == targets, probs_b.argmax(1) == targets
    slow = paired_bootstrap(
        lambda i: accuracy(probs_a[i], targets[i]), lambda i: accuracy(probs_b[i], targets[i]), 50, 400, 7
    )
    fast = paired_accuracy(correct_a, correct_b, resamples=400, seed=7)
    assert slow.keys() == fast.keys()
    for key in slow:
        assert slow[key] == pytest.approx(fast[key], abs=1e-12), key
