"""Feature extraction: a frozen pretrained backbone, a new head."""

from __future__ import annotations

from typing import Any

from transfer_learning.errors import ConfigError
from transfer_learning.features import check_cached_batch_size
from transfer_learning.model.network import Network
from transfer_learning.model.strategies.base import FeatureRequest, Strategy, positive


class FeatureExtraction(Strategy):
    """Frozen pretrained backbone (kept in eval mode, so BatchNorm statistics stay pretrained);
    only the new head trains. Auxiliary classifiers are dropped: a backbone in eval mode never
    feeds them."""

    name = "feature_extract"
    bf16: bool | None

    def __init__(
        self,
        head_lr: float = 1e-2,
        cache_features: bool = True,
        cached_views: int = 1,
        bf16: bool | None = None,
        backbone_lr: float | None = None,
        cached_batch_size: int | str | None = "auto",
    ) -> None:
        """``cache_features``: run the frozen backbone once per image and train the head on
        stored features (``cached_views`` augmented views per training image; 1 is exact).
        ``bf16``: autocast the backbone's forward pass to bfloat16; None decides from the
        hardware (GPUs and CPUs with AVX-512 BF16 or AMX). ``backbone_lr`` has no effect (nothing
        in the backbone trains); it is accepted so that one search space (hparams_search=optuna)
        can sweep both strategies. ``cached_batch_size``: the training batch on cached features:
        ``auto`` grows it with the data (:func:`~transfer_learning.data.loaders.cached_batch_size`),
        None keeps ``data.batch_size``."""
        del backbone_lr
        self.head_lr = positive("head_lr", head_lr)
        if cached_views < 1:
            raise ConfigError(f"strategy.cached_views={cached_views}: at least one view per image.")
        self.cache_features = bool(cache_features)
        self.cached_views = int(cached_views)
        self.bf16 = bf16
        self.cached_batch_size = check_cached_batch_size(cached_batch_size)

    def training_features(self) -> FeatureRequest | None:
        if not self.cache_features:
            return None
        return FeatureRequest(views=self.cached_views, bf16=self.bf16, batch_size=self.cached_batch_size)

    def prepare(self, net: Network) -> None:
        net.drop_aux()
        net.freeze_backbone()

    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        return [{"name": "head", "params": list(net.head_parameters()), "lr": self.head_lr}]
