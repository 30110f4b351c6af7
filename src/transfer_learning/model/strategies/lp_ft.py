"""LP-FT: a linear probe on frozen features, then fine-tuning everything from that head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from transfer_learning.errors import ConfigError
from transfer_learning.model.metrics import mean_average_precision
from transfer_learning.model.network import Network
from transfer_learning.model.strategies.base import FeatureRequest, Split
from transfer_learning.model.strategies.finetuning import FineTuning


class LinearProbeFineTune(FineTuning):
    """LP-FT (Kumar et al., 2022): first fit the new head to convergence on the frozen features
    (a linear probe: L-BFGS on cached features, its L2 strength chosen on the validation split,
    about the cost of one forward pass over the data), then fine-tune everything at small rates.
    Starting from a good head, fine-tuning moves the pretrained features less than it does from
    a random head, which helps most when the new data differ from the old."""

    name = "lp_ft"

    def __init__(
        self,
        head_lr: float = 1e-4,
        backbone_lr: float = 1e-4,
        probe_weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2),
        probe_steps: int = 200,
        freeze_bn_stats: bool = True,
        exempt_norm_bias: bool = False,
    ) -> None:
        super().__init__(head_lr, backbone_lr, freeze_bn_stats, exempt_norm_bias)
        self.probe_weight_decays = [float(w) for w in probe_weight_decays]
        if not self.probe_weight_decays or any(w < 0 for w in self.probe_weight_decays):
            raise ConfigError(
                f"strategy.probe_weight_decays={list(probe_weight_decays)}: one or more L2 strengths, "
                "each >= 0."
            )
        if probe_steps < 1:
            raise ConfigError(f"strategy.probe_steps={probe_steps}: at least 1 L-BFGS step.")
        self.probe_steps = int(probe_steps)

    def features_before_fit(self) -> FeatureRequest | None:
        return FeatureRequest(views=1, bf16=False, splits=("train", "val"))  # the probe wants exact features

    def before_fit(self, net: Network, features: Mapping[str, Split], multilabel: bool) -> dict[str, float]:
        """The linear probe: ``net.head`` fitted (in place) on the training features, once per L2
        strength, the one with the lowest validation loss kept."""
        return fit_linear_head(
            net.head,
            features["train"],
            features.get("val"),
            self.probe_weight_decays,
            self.probe_steps,
            multilabel,
        )


def _probe_loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean cross-entropy over samples; multi-label: each class's binary cross-entropy, averaged
    over samples and summed over classes (so each class is its own logistic regression)."""
    if not multilabel:
        return nn.functional.cross_entropy(logits, y)
    return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(y)


def _probe_score(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> float:
    """Accuracy (multiclass) or macro mAP (multilabel) of the probe's logits."""
    if multilabel:
        return mean_average_precision(logits.sigmoid(), y)
    return float((logits.argmax(1) == y).double().mean())


def fit_linear_head(
    head: nn.Linear,
    train: Split,
    val: Split | None,
    weight_decays: Sequence[float],
    steps: int,
    multilabel: bool = False,
) -> dict[str, float]:
    """Logistic regression on fixed features with full-batch L-BFGS, in float64 for a clean
    optimum: multinomial (multiclass), or one binary regression per class (multilabel); the L2
    strength with the lowest validation loss wins and its weights are copied into ``head``.
    Returns ``weight_decay``, ``val_loss`` and the score on both splits: ``val_acc`` and
    ``train_acc`` (multiclass) or ``val_map`` and ``train_map`` (multilabel). Without a
    validation split (cv.refit=true's run) there must be one strength, and the scores are the
    training split's."""
    if val is None and len(weight_decays) != 1:
        raise ConfigError(
            f"strategy.probe_weight_decays={list(weight_decays)}: without a validation split "
            "(cv.refit=true) the probe cannot choose an L2 strength; give the one the folds chose, e.g. "
            "strategy.probe_weight_decays=[1e-3] (each fold's summary says it under 'linear probe')."
        )
    x, y = train[0].double(), train[1].double() if multilabel else train[1].long()
    score = "map" if multilabel else "acc"
    best: dict[str, Any] = {}
    for decay in weight_decays:
        weight = torch.zeros(head.out_features, head.in_features, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(head.out_features, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            lr=1,
            max_iter=steps,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def closure(
            w: torch.Tensor = weight, b: torch.Tensor = bias, d: float = decay, opt: Any = optimizer
        ) -> torch.Tensor:
            opt.zero_grad()
            loss = _probe_loss(x @ w.T + b, y, multilabel) + 0.5 * d * w.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            scores = {f"train_{score}": _probe_score(x @ weight.T + bias, y, multilabel)}
            if val is not None:
                vx, vy = val[0].double(), val[1].double() if multilabel else val[1].long()
                logits = vx @ weight.T + bias
                scores = {"val_loss": float(_probe_loss(logits, vy, multilabel)),
                          f"val_{score}": _probe_score(logits, vy, multilabel), **scores}  # fmt: skip
        if not best or (val is not None and scores["val_loss"] < best["val_loss"]):
            best = {"weight_decay": decay, **scores, "weight": weight.detach(), "bias": bias.detach()}
    with torch.no_grad():
        head.weight.copy_(best.pop("weight").to(head.weight))
        head.bias.copy_(best.pop("bias").to(head.bias))
    return best
