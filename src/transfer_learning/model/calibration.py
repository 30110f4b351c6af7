"""Temperature scaling: probabilities that mean what they say.

A network fine-tuned on a few hundred images is usually over-confident: among the images it
gives 90 %, far fewer than 90 % are right. One scalar ``T`` fitted after training fixes most of
it: the logits are divided by ``T`` before the softmax (multi-label: before each sigmoid, one
``T`` shared by all classes), ``T`` chosen to minimise the negative log-likelihood of the
validation split under the best checkpoint (Guo et al., 2017), with a normal prior on log T
around 1: on 60 validation images, all right, the likelihood alone keeps rising as T falls and
a fit sharpens the logits without bound, which the first wrong test image then pays for. Where
the images cannot identify T (too few, none wrong, a gain within chance, a sharpening that one
more wrong image would undo) T = 1 is kept, and the summary says why. Dividing by a positive
scalar keeps every ranking, so accuracy, F1, mAP and the top-k are unchanged; only the
probabilities move (multi-label thresholds move with them, :meth:`TaskMetrics.set_temperature`).

Measured on the test split before and after (:func:`calibration_metrics`):

* ``ece``: expected calibration error, 15 equal-width confidence bins (torchmetrics; multi-label:
  every (image, class) probability is one binary prediction);
* ``nll``: mean negative log-likelihood (multi-label: binary cross-entropy per class, averaged);
* ``brier``: mean squared error between the probabilities and the one-hot truth, summed over
  the classes (multi-label: averaged over the classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15
# The fit's search range; a temperature at either end says the fit found no optimum inside it.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# The prior on log T: normal, centred on T = 1, this standard deviation (T within [0.37, 2.7]
# at 95 % before any image is seen). It adds (log T)^2 / (2 sd^2) to the summed NLL, so a few
# dozen images barely move T and a few thousand decide it alone.
PRIOR_SD = 0.5
# Fewer validation images than this: T stays 1 (no fit can be told from noise).
MIN_IMAGES = 10
# A fitted T replaces 1 only when the likelihood-ratio test rejects T = 1 at 5 %: twice the
# summed log-likelihood gain above the chi-squared quantile for one parameter. On 30 images a
# fit that gains less is noise, and it made the test ECE worse as often as better.
LIKELIHOOD_RATIO = 3.84


@dataclass(frozen=True)
class TemperatureFit:
    """The chosen temperature, whether it was ``fitted`` or ``kept`` at 1, and why (one
    clause, for the run summary)."""

    temperature: float
    fitted: bool
    why: str


def nll(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean negative log-likelihood of ``targets`` under ``logits``."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets)


def errors(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> int:
    """How many predictions ``logits`` get wrong (multi-label: (image, class) pairs on the wrong
    side of logit 0). With none, the likelihood rises for ever as T falls: no finite optimum."""
    if multilabel:
        return int(((logits > 0) != targets.bool()).sum())
    return int((logits.argmax(1) != targets).sum())


def choose_temperature(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> TemperatureFit:
    """The temperature for ``logits / T``: the maximum a posteriori fit of log T (summed NLL plus
    the normal prior of :data:`PRIOR_SD` around T = 1; LBFGS in float64), or T = 1 kept when the
    samples cannot identify one: fewer than :data:`MIN_IMAGES`, no wrong prediction among them
    (the likelihood alone would sharpen without bound, and the first wrong test image would pay
    for it), an optimum below the search range (above it, T is clipped to its top), a gain
    over T = 1 that the likelihood-ratio test calls chance (:data:`LIKELIHOOD_RATIO`), or a
    sharpening (T < 1) that one more wrong image, as confident as the network's median right
    one, would undo: with 1 of 240 wrong, T 0.48 doubled a test NLL whose one wrong image was
    confident."""
    n = len(logits)
    if n < MIN_IMAGES:
        return TemperatureFit(1.0, False, f"only {n} images, fewer than {MIN_IMAGES}")
    z = logits.detach().double().cpu()
    y = targets.detach().cpu()
    wrong = errors(z, y, multilabel)
    if wrong == 0:
        what = "class calls" if multilabel else "images"
        return TemperatureFit(1.0, False, f"all {z.numel() if multilabel else n} {what} right: no finite fit")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")
    total = y.numel() if multilabel else n  # the mean NLL back to a sum over predictions

    def objective(t: torch.Tensor) -> torch.Tensor:
        return nll(z / t.exp(), y, multilabel) * total + t**2 / (2 * PRIOR_SD**2)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective(log_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= MIN_TEMPERATURE:
        return TemperatureFit(1.0, False, "the fit sharpened without bound")
    temperature = min(temperature, MAX_TEMPERATURE)  # wildly over-confident: as soft as allowed
    with torch.no_grad():
        gain = float(nll(z, y, multilabel) - nll(z / temperature, y, multilabel)) * total
    if 2 * gain < LIKELIHOOD_RATIO:
        return TemperatureFit(
            1.0, False, f"T = {temperature:.2f} fits these images no better than T = 1 beyond chance "
            f"(likelihood-ratio test, 5 %: 2 x {gain:.2f} < {LIKELIHOOD_RATIO})"
        )  # fmt: skip
    if temperature < 1:
        z_more, y_more = _one_more_wrong(z, y, multilabel)
        with torch.no_grad():
            after = float(nll(z_more, y_more, multilabel) - nll(z_more / temperature, y_more, multilabel))
        if after <= 0:
            return TemperatureFit(
                1.0, False, f"T = {temperature:.2f} would sharpen on {wrong} wrong of {total}: one more "
                "wrong image, as confident as the network usually is when right, would undo its gain"
            )  # fmt: skip
    return TemperatureFit(temperature, True, f"{wrong} of {total} predictions wrong")


def _one_more_wrong(z: torch.Tensor, y: torch.Tensor, multilabel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples plus one wrong prediction as confident as the network's median right one
    (Laplace's rule of succession: with few errors seen, expect one more). Multiclass: that
    image, labelled its runner-up class; multi-label: that image with its median-confidence
    right class call flipped."""
    if multilabel:
        right = ((z > 0) == y.bool()).flatten()
        margins = z.abs().flatten()
        chosen = torch.nonzero(right).flatten()
        k = int(chosen[margins[chosen].argsort()[len(chosen) // 2]])
        i, c = divmod(k, z.shape[1])
        row = y[i].clone()
        row[c] = 1 - row[c]
        return torch.cat([z, z[i : i + 1]]), torch.cat([y, row[None]])
    right = torch.nonzero(z.argmax(1) == y).flatten()
    confidence = z[right].softmax(1).amax(1)
    i = int(right[confidence.argsort()[len(right) // 2]])
    runner_up = int(z[i].argsort(descending=True)[1])
    return torch.cat([z, z[i : i + 1]]), torch.cat([y, y.new_tensor([runner_up])])


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> float:
    """:func:`choose_temperature`'s temperature."""
    return choose_temperature(logits, targets, multilabel).temperature


def calibration_metrics(probs: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> dict[str, float]:
    """ECE (15 bins), NLL and Brier score of ``probs`` (N, C) against ``targets`` (N class
    indices; multi-label: an (N, C) 0/1 matrix)."""
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    if len(probs) == 0:
        return {"ece": math.nan, "nll": math.nan, "brier": math.nan}
    p = probs.detach().double().cpu()
    y = targets.detach().cpu()
    eps = 1e-12
    if multilabel:
        y = y.double()
        ece = binary_calibration_error(p.flatten(), y.flatten().long(), n_bins=ECE_BINS, norm="l1")
        loss = -(y * p.clamp_min(eps).log() + (1 - y) * (1 - p).clamp_min(eps).log()).mean()
        brier = ((p - y) ** 2).mean()
    else:
        y = y.long()
        ece = multiclass_calibration_error(p, y, num_classes=p.shape[1], n_bins=ECE_BINS, norm="l1")
        loss = -p[torch.arange(len(y)), y].clamp_min(eps).log().mean()
        brier = ((p - F.one_hot(y, p.shape[1]).double()) ** 2).sum(1).mean()
    return {"ece": float(ece), "nll": float(loss), "brier": float(brier)}


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> list[dict[str, Any]]:
    """The reliability diagram's numbers: per confidence bin (15 equal-width bins of the top
    probability; multi-label: of every class probability), the images in it, their mean
    confidence and the share that is right."""
    p = probs.detach().double().cpu()
    y = targets.detach().cpu()
    if multilabel:
        confidence, correct = p.flatten(), y.double().flatten()
    else:
        confidence, predicted = p.max(dim=1)
        correct = (predicted == y.long()).double()
    edges = torch.linspace(0, 1, ECE_BINS + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1], right=True)  # bin i: (edge i, edge i+1]
    rows = []
    for i in range(ECE_BINS):
        inside = index == i
        n = int(inside.sum())
        rows.append({
            "low": float(edges[i]),
            "high": float(edges[i + 1]),
            "count": n,
            "confidence": float(confidence[inside].mean()) if n else None,
            "accuracy": float(correct[inside].mean()) if n else None,
        })  # fmt: skip
    return rows
