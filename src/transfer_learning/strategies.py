"""Transfer-learning strategies: what trains, at which learning rate, and in which mode.

Every param group is built up front from the body/head split, so nothing depends on
freezing or unfreezing parameters after the optimizer (or DDP) has been set up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from transfer_learning.backbones import Backbone
from transfer_learning.errors import ConfigError


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"strategy.{name}={value}: a learning rate must be positive.")
    return float(value)


class Strategy(ABC):
    """Prepares a backbone for training and hands the optimizer its param groups."""

    name: str

    @abstractmethod
    def prepare(self, backbone: Backbone) -> None:
        """Set requires_grad and train/eval policy on the backbone."""

    @abstractmethod
    def param_groups(self, backbone: Backbone) -> list[dict[str, Any]]:
        """Optimizer param groups, each with a ``name`` and its own ``lr``."""


class FeatureExtraction(Strategy):
    """Frozen pretrained body (kept in eval mode, so BatchNorm statistics stay pretrained);
    only the new head trains. Auxiliary classifiers are dropped: a body in eval mode never
    feeds them."""

    name = "feature_extract"

    def __init__(self, head_lr: float = 1e-2) -> None:
        self.head_lr = _positive("head_lr", head_lr)

    def prepare(self, backbone: Backbone) -> None:
        backbone.drop_aux()
        backbone.body.requires_grad_(False)
        backbone.head.requires_grad_(True)
        backbone.body_frozen = True
        backbone.train(backbone.training)  # apply the eval policy now, not at the next train()

    def param_groups(self, backbone: Backbone) -> list[dict[str, Any]]:
        return [{"name": "head", "params": list(backbone.head_parameters()), "lr": self.head_lr}]


class FineTuning(Strategy):
    """Everything trains: the pretrained body at ``backbone_lr``, the new head (and auxiliary
    heads) at ``head_lr``. ``freeze_bn_stats`` keeps BatchNorm running statistics pretrained,
    which helps with small batches."""

    name = "finetune"

    def __init__(
        self, head_lr: float = 1e-3, backbone_lr: float = 1e-4, freeze_bn_stats: bool = False
    ) -> None:
        self.head_lr = _positive("head_lr", head_lr)
        self.backbone_lr = _positive("backbone_lr", backbone_lr)
        self.freeze_bn_stats = bool(freeze_bn_stats)

    def prepare(self, backbone: Backbone) -> None:
        backbone.requires_grad_(True)
        backbone.body_frozen = False
        backbone.norm_frozen = self.freeze_bn_stats
        backbone.train(backbone.training)

    def param_groups(self, backbone: Backbone) -> list[dict[str, Any]]:
        return [
            {
                "name": "backbone",
                "params": list(backbone.body_parameters()),
                "lr": self.backbone_lr,
            },
            {"name": "head", "params": list(backbone.head_parameters()), "lr": self.head_lr},
        ]
