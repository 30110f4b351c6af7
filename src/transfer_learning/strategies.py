"""Transfer-learning strategies: what trains, at which learning rate, and in which mode.

Every param group is built up front from the backbone/head split, so nothing depends on
freezing or unfreezing parameters after the optimizer (or DDP) has been set up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from transfer_learning.errors import ConfigError
from transfer_learning.network import Network


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"strategy.{name}={value}: a learning rate must be positive.")
    return float(value)


class Strategy(ABC):
    """Prepares a network for training and hands the optimizer its param groups."""

    name: str

    @abstractmethod
    def prepare(self, net: Network) -> None:
        """Decide what trains: freeze or unfreeze the backbone, keep or drop auxiliary heads."""

    @abstractmethod
    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        """Optimizer param groups, each with a ``name`` and its own ``lr``."""


class FeatureExtraction(Strategy):
    """Frozen pretrained backbone (kept in eval mode, so BatchNorm statistics stay pretrained);
    only the new head trains. Auxiliary classifiers are dropped: a backbone in eval mode never
    feeds them."""

    name = "feature_extract"

    def __init__(
        self,
        head_lr: float = 1e-2,
        cache_features: bool = True,
        cached_views: int = 1,
        bf16: bool | None = None,
        backbone_lr: float | None = None,
    ) -> None:
        """``cache_features``: run the frozen backbone once per image and train the head on
        stored features (``cached_views`` augmented views per training image; 1 is exact).
        ``bf16``: autocast the backbone's forward pass to bfloat16; None decides from the
        hardware (GPUs and CPUs with AVX-512 BF16 or AMX). ``backbone_lr`` has no effect (nothing
        in the backbone trains); it is accepted so that one search space (hparams_search=optuna)
        can sweep both strategies."""
        del backbone_lr
        self.head_lr = _positive("head_lr", head_lr)
        if cached_views < 1:
            raise ConfigError(f"strategy.cached_views={cached_views}: at least one view per image.")
        self.cache_features = bool(cache_features)
        self.cached_views = int(cached_views)
        self.bf16 = bf16

    def prepare(self, net: Network) -> None:
        net.drop_aux()
        net.freeze_backbone()

    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        return [{"name": "head", "params": list(net.head_parameters()), "lr": self.head_lr}]


class FineTuning(Strategy):
    """Everything trains: the pretrained backbone at ``backbone_lr``, the new head (and auxiliary
    heads) at ``head_lr``. ``freeze_bn_stats`` keeps BatchNorm running statistics pretrained,
    which helps with small batches."""

    name = "finetune"

    def __init__(
        self, head_lr: float = 1e-3, backbone_lr: float = 1e-4, freeze_bn_stats: bool = False
    ) -> None:
        self.head_lr = _positive("head_lr", head_lr)
        self.backbone_lr = _positive("backbone_lr", backbone_lr)
        self.freeze_bn_stats = bool(freeze_bn_stats)

    def prepare(self, net: Network) -> None:
        net.unfreeze_backbone(freeze_norm_stats=self.freeze_bn_stats)

    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        return [
            {"name": "backbone", "params": list(net.backbone_parameters()), "lr": self.backbone_lr},
            {"name": "head", "params": list(net.head_parameters()), "lr": self.head_lr},
        ]
