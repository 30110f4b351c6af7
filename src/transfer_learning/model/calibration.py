"""Temperature scaling: probabilities that mean what they say.

A network fine-tuned on a few hundred images is usually over-confident: among the images it
gives 90 %, far fewer than 90 % are right. One scalar ``T`` fitted after training fixes most of
it: the logits are divided by ``T`` before the softmax (multi-label: before each sigmoid, one
``T`` shared by all classes), ``T`` chosen to minimise the negative log-likelihood of the
validation split under the best checkpoint (Guo et al., 2017). Dividing by a positive scalar
keeps every ranking, so accuracy, F1, mAP and the top-k are unchanged; only the probabilities
move (multi-label thresholds move with them, :meth:`TaskMetrics.set_temperature`).

Measured on the test split before and after (:func:`calibration_metrics`):

* ``ece``: expected calibration error, 15 equal-width confidence bins (torchmetrics; multi-label:
  every (image, class) probability is one binary prediction);
* ``nll``: mean negative log-likelihood (multi-label: binary cross-entropy per class, averaged);
* ``brier``: mean squared error between the probabilities and the one-hot truth, summed over
  the classes (multi-label: averaged over the classes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15
# A temperature outside this range says the validation split cannot support the fit (a handful
# of images, all right: the likelihood keeps rising as T -> 0); it is clipped, and the summary says.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def nll(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean negative log-likelihood of ``targets`` under ``logits``."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> float:
    """The temperature that minimises the NLL of ``targets`` under ``logits / T`` (LBFGS on
    log T, in float64), within [MIN_TEMPERATURE, MAX_TEMPERATURE]; 1.0 without samples. Never
    worse on these samples than T = 1 (then 1.0 is returned)."""
    if len(logits) == 0:
        return 1.0
    z = logits.detach().double().cpu()
    y = targets.detach().cpu()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(z / log_t.exp(), y, multilabel)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    temperature = min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)
    with torch.no_grad():
        if nll(z / temperature, y, multilabel) > nll(z, y, multilabel):
            return 1.0
    return temperature


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
