"""The headline metrics of a set of predictions, from probabilities: accuracy, macro F1, exact
match, mean average precision and expected calibration error, each evaluated on every image or,
for the bootstrap of :mod:`transfer_learning.results.intervals`, on many resamples at once.

A resample is represented by how often it drew each image (an (R, N) matrix of counts); each metric
here is a sum over images weighted by those counts (or, for average precision, a ranking whose
cumulative sums are weighted by them), so all resamples are evaluated at once. The point values
are the same code with every count 1.

Definitions (probabilities, not logits; single-label targets are class indices, multi-label
targets 0/1 with "positive" meaning > 0.5, and a multi-label class is called when its probability
is >= its threshold, as in :mod:`transfer_learning.model.metrics`):

- macro F1: the mean over classes of 2 TP / (2 TP + FP + FN). Single-label, a class absent from
  both the truth and the predictions of the (resampled) images (F1 0 / 0) is left out, as
  torchmetrics' ``multiclass_f1_score(average="macro")`` does; multi-label, it counts as 0 and the
  mean is over every class, as the run's ``multilabel_scores`` (:mod:`transfer_learning.model.metrics`)
  and torchmetrics' ``multilabel_f1_score`` do. Either way the point value is the number the run
  and eval report.
- mean average precision: the mean, over the classes with at least one positive, of scikit-learn's
  average precision (the sum over distinct scores, highest first, of recall gained x precision;
  equal scores form one step). NaN where no class has a positive.
- ECE: torchmetrics' ``multiclass_calibration_error(norm="l1")`` (single-label, the top-class
  probability against whether the top class is right) and ``binary_calibration_error(norm="l1")``
  (multi-label: every (image, class) probability is one binary prediction, confidence p, right when
  the class is positive), with the same equal-width bins.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray
Thresholds = Tensor | np.ndarray | float | None

DEFAULT_THRESHOLD = 0.5
ECE_BINS = 15
# (resamples x classes x images) elements per step of the vectorised average precision.
_AP_CHUNK_ELEMENTS = 4_000_000

NAN = float("nan")


# ----------------------------------------------------------------------------- inputs


def cpu_tensor(values: ArrayLike) -> Tensor:
    """``values`` as a CPU tensor, detached from any graph."""
    return torch.as_tensor(values).detach().cpu()


def _float_probs(probs: ArrayLike) -> Tensor:
    """Probabilities as float32 or float64 (half precision is widened), shape (N, C)."""
    out = cpu_tensor(probs)
    if out.dtype not in (torch.float32, torch.float64):
        out = out.float()
    if out.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(out.shape)}")
    return out


def _single_inputs(probs: ArrayLike, targets: ArrayLike) -> tuple[Tensor, Tensor]:
    """(N, C) probabilities and (N,) long class indices, checked against each other."""
    p, t = _float_probs(probs), cpu_tensor(targets).long()
    if t.shape != p.shape[:1]:
        raise ValueError(f"targets must be (N,) = {tuple(p.shape[:1])}, got {tuple(t.shape)}")
    return p, t


def _multi_inputs(probs: ArrayLike, targets: ArrayLike) -> tuple[Tensor, Tensor]:
    """(N, C) probabilities and (N, C) bool truth (targets > 0.5), checked against each other."""
    p, t = _float_probs(probs), cpu_tensor(targets)
    if t.shape != p.shape:
        raise ValueError(f"targets must have probs' shape {tuple(p.shape)}, got {tuple(t.shape)}")
    return p, t > 0.5


def _calls(probs: Tensor, thresholds: Thresholds) -> Tensor:
    """(N, C) bool: probability >= the class's threshold (0.5 when ``thresholds`` is None)."""
    thr = torch.as_tensor(DEFAULT_THRESHOLD if thresholds is None else thresholds).detach().cpu()
    if thr.ndim > 1 or (thr.ndim == 1 and thr.shape[0] != probs.shape[1]):
        raise ValueError(f"thresholds must be a scalar or ({probs.shape[1]},), got {tuple(thr.shape)}")
    return probs >= thr.to(probs.dtype)


def each_once(n: int) -> Tensor:
    """The counts of the full image set: one row, every image once."""
    return torch.ones(1, n, dtype=torch.float64)


# ----------------------------------------------------------------------------- resampled metrics
# Each takes per-image data and an (R, N) float64 matrix of how often resample r drew image i,
# and returns the (R,) float64 metric of every resample.


def share(hits: Tensor, counts: Tensor) -> Tensor:
    """The weighted share of (N,) bool ``hits``; NaN for an empty resample."""
    return counts @ hits.double() / counts.sum(1)


def _macro_f1(called: Tensor, truth: Tensor, counts: Tensor, skip_absent: bool = True) -> Tensor:
    """Macro F1 from (N, C) bool calls and truth; a class with 2 TP + FP + FN == 0 is left out
    (``skip_absent``, single-label) or counts as 0 (multi-label)."""
    c, t = called.double(), truth.double()
    tp, fp, fn = counts @ (c * t), counts @ (c * (1 - t)), counts @ ((1 - c) * t)
    den = 2 * tp + fp + fn
    present = den > 0
    f1 = torch.where(present, 2 * tp / den.clamp(min=1e-300), torch.zeros_like(den))
    if not skip_absent:
        return torch.where(counts.sum(1) > 0, f1.mean(1), torch.full_like(f1[:, 0], NAN))
    return f1.sum(1) / present.sum(1)  # 0 / 0 = NaN where no class is present


def _ece(confidence: Tensor, right: Tensor, counts: Tensor, bins: int) -> Tensor:
    """L1 expected calibration error of (N, K) confidences and rightness (K binary predictions
    per image), with torchmetrics' equal-width bins (a confidence of exactly 1 sits alone in the
    last one). Sum over bins of |sum(right) - sum(confidence)| / predictions: the same as the
    bin-share-weighted |accuracy - confidence|, without dividing by empty bins."""
    boundaries = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    which = torch.bucketize(confidence, boundaries, right=True) - 1
    gap = torch.zeros(confidence.shape[0], bins + 1, dtype=torch.float64)
    gap.scatter_add_(1, which, right.double() - confidence.double())
    return (counts @ gap).abs().sum(1) / (counts.sum(1) * confidence.shape[1])


def _mean_ap(probs: Tensor, truth: Tensor, counts: Tensor) -> Tensor:
    """Mean over classes with a positive of average precision, every resample at once. Each
    class's images are ranked once; a resample weights the ranking by its counts. Every image's
    recall gain is paid at the precision of the end of its tie group (equal scores are one step)."""
    n, classes = probs.shape
    out = torch.empty(counts.shape[0], dtype=torch.float64)
    if n == 0 or classes == 0:
        return out.fill_(NAN)
    scores = probs.T  # (C, N)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ranked = torch.gather(scores, 1, order)
    positive = torch.gather(truth.T, 1, order).double()  # (C, N)
    # The position of the last member of each image's tie group.
    ends = torch.ones_like(ranked, dtype=torch.bool)
    ends[:, :-1] = ranked[:, :-1] != ranked[:, 1:]
    position = torch.arange(n).expand(classes, n)
    group_end = torch.where(ends, position, torch.full_like(position, n))
    group_end = torch.flip(torch.cummin(torch.flip(group_end, [1]), dim=1).values, [1])
    step = max(1, _AP_CHUNK_ELEMENTS // (classes * n))
    for start in range(0, counts.shape[0], step):
        weights = counts[start : start + step][:, order]  # (r, C, N)
        gained = weights * positive
        tp = torch.cumsum(gained, dim=2)
        seen = torch.cumsum(weights, dim=2)
        precision = torch.where(seen > 0, tp / seen.clamp(min=1e-300), torch.zeros_like(seen))
        precision = torch.gather(precision, 2, group_end.expand_as(precision))
        total = tp[:, :, -1]
        ap = (gained * precision).sum(2) / total  # NaN for a class without positives
        out[start : start + step] = torch.nanmean(ap, dim=1)
    return out


# ----------------------------------------------------------------------------- metrics on one set


def accuracy(probs: ArrayLike, targets: ArrayLike) -> float:
    """Share of images whose top class (argmax of the (N, C) ``probs``) is the (N,) target.
    Returns a float, NaN for no images."""
    p, t = _single_inputs(probs, targets)
    return float(share(p.argmax(1) == t, each_once(len(t)))[0])


def macro_f1(probs: ArrayLike, targets: ArrayLike, num_classes: int | None = None) -> float:
    """Macro F1 of the top-class predictions over ``num_classes`` classes (default: probs'
    columns), skipping classes absent from both targets and predictions (see the module notes).
    Returns a float, NaN for no images."""
    p, t = _single_inputs(probs, targets)
    k = p.shape[1] if num_classes is None else num_classes
    called = torch.nn.functional.one_hot(p.argmax(1), k).bool()
    truth = torch.nn.functional.one_hot(t, k).bool()
    return float(_macro_f1(called, truth, each_once(len(t)))[0])


def exact_match(probs: ArrayLike, targets: ArrayLike, thresholds: Thresholds = None) -> float:
    """Multi-label: share of images whose whole called label set (probability >= threshold; a (C,)
    tensor or a scalar, 0.5 by default) equals the true set. Returns a float, NaN for no images."""
    p, truth = _multi_inputs(probs, targets)
    return float(share((_calls(p, thresholds) == truth).all(1), each_once(len(p)))[0])


def multilabel_macro_f1(probs: ArrayLike, targets: ArrayLike, thresholds: Thresholds = None) -> float:
    """Multi-label macro F1 at ``thresholds`` (as for :func:`exact_match`), the mean over every
    class (a class absent from both truth and calls counts as 0). Returns a float, NaN for no
    images."""
    p, truth = _multi_inputs(probs, targets)
    return float(_macro_f1(_calls(p, thresholds), truth, each_once(len(p)), skip_absent=False)[0])


def mean_average_precision(probs: ArrayLike, targets: ArrayLike) -> float:
    """Multi-label: mean over the classes with at least one positive of scikit-learn's average
    precision. Returns a float, NaN when no class has a positive."""
    p, truth = _multi_inputs(probs, targets)
    return float(_mean_ap(p, truth, each_once(len(p)))[0])


def _ece_inputs(p: Tensor, targets: ArrayLike, multilabel: bool) -> tuple[Tensor, Tensor]:
    """(N, K) confidences and rightness: K = 1 (top class) single-label, K = C multi-label."""
    if multilabel:
        _, truth = _multi_inputs(p, targets)
        return p, truth
    _, t = _single_inputs(p, targets)
    confidence, predicted = p.max(1)
    return confidence[:, None], (predicted == t)[:, None]


def ece(probs: ArrayLike, targets: ArrayLike, multilabel: bool, bins: int = ECE_BINS) -> float:
    """Expected calibration error (L1, ``bins`` equal-width bins), as torchmetrics computes it
    (see the module notes). Returns a float, NaN for no images."""
    confidence, right = _ece_inputs(_float_probs(probs), targets, multilabel)
    return float(_ece(confidence, right, each_once(len(confidence)), bins)[0])


# ----------------------------------------------------------------------------- every headline metric


def per_image_metrics(
    probs: ArrayLike, targets: ArrayLike, multilabel: bool, thresholds: Thresholds
) -> dict[str, Callable[[Tensor], Tensor]]:
    """Each headline metric as a function of an (R, N) count matrix (how often each resample drew
    each image), returning (R,) values; ``acc`` / ``exact_match`` first. Two models' functions
    evaluated on the same counts give a paired bootstrap
    (:func:`transfer_learning.results.intervals.paired_metric`)."""
    p = _float_probs(probs)
    confidence, right = _ece_inputs(p, targets, multilabel)
    if multilabel:
        if thresholds is None:
            thresholds = DEFAULT_THRESHOLD
        _, truth = _multi_inputs(p, targets)
        called = _calls(p, thresholds)
        exact = (called == truth).all(1)
        return {
            "exact_match": lambda w: share(exact, w),
            "map": lambda w: _mean_ap(p, truth, w),
            "f1": lambda w: _macro_f1(called, truth, w, skip_absent=False),
            "ece": lambda w: _ece(confidence, right, w, ECE_BINS),
        }
    if thresholds is not None:
        raise ValueError("thresholds apply to multi-label results only")
    _, t = _single_inputs(p, targets)
    k = p.shape[1]
    predicted = p.argmax(1)
    onehot_called = torch.nn.functional.one_hot(predicted, k).bool()
    onehot_truth = torch.nn.functional.one_hot(t, k).bool()
    correct = predicted == t
    return {
        "acc": lambda w: share(correct, w),
        "f1": lambda w: _macro_f1(onehot_called, onehot_truth, w),
        "ece": lambda w: _ece(confidence, right, w, ECE_BINS),
    }


def point_values(
    probs: ArrayLike, targets: ArrayLike, multilabel: bool, thresholds: Thresholds = None
) -> dict[str, float]:
    """The headline metrics on all images, with the keys of
    :func:`transfer_learning.results.intervals.intervals`: ``acc``, ``f1``, ``ece`` (single-label)
    or ``exact_match``, ``map``, ``f1``, ``ece`` (multi-label). Returns floats, NaN where undefined
    (no images; no positive class for ``map``)."""
    metrics = per_image_metrics(probs, targets, multilabel, thresholds)
    n = len(cpu_tensor(targets))
    return {name: float(metric(each_once(n))[0]) for name, metric in metrics.items()}
