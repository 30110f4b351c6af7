"""The :class:`Strategy` base class: what every strategy answers, and the hooks through which it
declares what it needs from the rest of the template."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from transfer_learning.errors import ConfigError
from transfer_learning.model.network import Network

#: Features and targets of one split: (N, D) features, and (N,) class indices (multiclass) or
#: (N, C) 0/1 floats (multilabel).
Split = tuple[torch.Tensor, torch.Tensor]


def positive(name: str, value: float) -> float:
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


@dataclass(frozen=True)
class FeatureRequest:
    """Backbone features a strategy asks for, computed once per image by the frozen pretrained
    backbone and kept in the feature cache (``paths.feature_cache_dir``).

    ``views``: stored views per training image; 1 is exact (the evaluation transform), more are
    augmented views, epoch ``e`` reading view ``e mod views``. ``bf16``: bfloat16 autocast for
    the backbone (None: where the hardware pays for it; False: exact float32). ``splits``: the
    splits wanted (for :meth:`Strategy.features_before_fit`; training features cover them all).
    ``batch_size``: the training batch on cached features."""

    views: int = 1
    bf16: bool | None = False
    splits: tuple[str, ...] = ("train", "val")
    #: Training batch on cached features: rows, ``auto`` or None (``data.batch_size``, as on images).
    batch_size: int | str | None = None


class Strategy(ABC):
    """Prepares a network for training and hands the optimizer its param groups.

    The class attributes and the ``*features*`` / :meth:`before_fit` hooks declare what the
    strategy needs; their defaults need nothing (images in, every step a training step)."""

    name: str

    #: The learning-rate attributes the LR finder (``tune_lr=true``) scales together, ``head_lr``
    #: first: its suggestion becomes ``head_lr`` and the others keep their ratio to it.
    lr_names: tuple[str, ...] = ("head_lr",)
    #: Whether the training loss takes the data's loss weights (``data.balance=weighted_loss``).
    uses_loss_weights = True
    #: bfloat16 autocast for a frozen backbone's forward pass (None: where the hardware pays).
    bf16: bool | None = False

    def training_features(self) -> FeatureRequest | None:
        """Cached backbone features to train (and evaluate) the head on instead of images; only
        for a strategy whose backbone stays frozen and in eval mode throughout. None: images."""
        return None

    def features_before_fit(self) -> FeatureRequest | None:
        """Features that :meth:`before_fit` reads (exact ones, by default of train and val)."""
        return None

    def before_fit(
        self, net: Network, features: Mapping[str, Split], multilabel: bool
    ) -> dict[str, float] | None:
        """A step before the first epoch of a new run (not of a resumed one), e.g. fitting the head
        on the features :meth:`features_before_fit` asked for (given per split, on the network's
        device). Every process runs it on the same features; the head is then taken from rank zero.
        Returns numbers for the run summary, or None."""
        return None

    @abstractmethod
    def prepare(self, net: Network) -> None:
        """Decide what trains: freeze or unfreeze the backbone, keep or drop auxiliary heads."""

    @abstractmethod
    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        """Optimizer param groups, each with a ``name`` and its own ``lr``."""

    #: True when what trains changes during the run: the parameters that do not train in an epoch
    #: get no gradient, so DDP must be told that some parameters may be unused, and the module
    #: applies :meth:`lr_scale` on top of the schedule.
    changes_what_trains = False

    def on_epoch_start(self, net: Network, epoch: int) -> None:
        """Set what trains in ``epoch`` (the same whether the run started there or resumed)."""
        return None

    def lr_scale(self, group: str, progress: float) -> float:
        """Factor on the scheduled learning rate of param group ``group`` at ``progress`` (epochs
        since the start, fractional within an epoch); 0 for a group that does not train yet."""
        return 1.0

    def check_epochs(self, max_epochs: int) -> str | None:
        """What goes wrong with an epoch budget this strategy cannot use (a warning), else None."""
        return None
