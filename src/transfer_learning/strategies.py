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


def split_decay(groups: list[dict[str, Any]], exempt_norm_bias: bool) -> list[dict[str, Any]]:
    """With ``exempt_norm_bias``, each group becomes two: its weights, and its biases and
    normalisation parameters (every parameter with fewer than two dimensions) under
    ``<name>/no_decay`` with ``weight_decay=0``. Without, the groups as they are."""
    if not exempt_norm_bias:
        return groups
    out = []
    for group in groups:
        params = group["params"]
        decayed = [p for p in params if p.ndim >= 2]
        exempt = [p for p in params if p.ndim < 2]
        if decayed:
            out.append({**group, "params": decayed})
        if exempt:
            out.append({**group, "name": f"{group['name']}/no_decay", "params": exempt, "weight_decay": 0.0})
    return out


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
        self,
        head_lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        freeze_bn_stats: bool = False,
        exempt_norm_bias: bool = False,
    ) -> None:
        self.head_lr = _positive("head_lr", head_lr)
        self.backbone_lr = _positive("backbone_lr", backbone_lr)
        self.freeze_bn_stats = bool(freeze_bn_stats)
        self.exempt_norm_bias = bool(exempt_norm_bias)

    def prepare(self, net: Network) -> None:
        net.unfreeze_backbone(freeze_norm_stats=self.freeze_bn_stats)

    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        groups = [
            {"name": "backbone", "params": list(net.backbone_parameters()), "lr": self.backbone_lr},
            {"name": "head", "params": list(net.head_parameters()), "lr": self.head_lr},
        ]
        return split_decay(groups, self.exempt_norm_bias)


class LayerDecay(Strategy):
    """Fine-tuning with layer-wise learning-rate decay: the head trains at ``head_lr``, and
    each backbone block (see :meth:`Network.blocks`) at ``head_lr * decay ** depth``, depth 1
    being the block next to the head. Lower layers hold the most general features and move the
    least. One param group per block (``block/<name>``), built up front: nothing changes during
    training, so DDP and resuming see the same groups throughout."""

    name = "layer_decay"

    def __init__(
        self,
        head_lr: float = 1e-3,
        decay: float = 0.7,
        freeze_bn_stats: bool = False,
        exempt_norm_bias: bool = False,
    ) -> None:
        self.head_lr = _positive("head_lr", head_lr)
        if not 0 < decay <= 1:
            raise ConfigError(f"strategy.decay={decay}: the per-block factor must be in (0, 1].")
        self.decay = float(decay)
        self.freeze_bn_stats = bool(freeze_bn_stats)
        self.exempt_norm_bias = bool(exempt_norm_bias)

    def prepare(self, net: Network) -> None:
        net.unfreeze_backbone(freeze_norm_stats=self.freeze_bn_stats)

    def block_lrs(self, net: Network) -> dict[str, float]:
        """Learning rate of each block, input side first."""
        blocks = net.blocks()
        return {name: self.head_lr * self.decay ** (len(blocks) - i) for i, (name, _) in enumerate(blocks)}

    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        rates = self.block_lrs(net)
        groups = [
            {"name": f"block/{name}", "params": params, "lr": rates[name]} for name, params in net.blocks()
        ]
        groups.append({"name": "head", "params": list(net.head_parameters()), "lr": self.head_lr})
        return split_decay(groups, self.exempt_norm_bias)
