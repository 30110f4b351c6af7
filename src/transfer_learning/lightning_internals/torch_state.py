"""Private state of torch and torchvision: which normalization layers keep running
statistics, torchvision's table of the weights' accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from transfer_learning.lightning_internals.checked import changed

# -- freeze_norm_stats: which layers keep running statistics -----------------------------------
# torch's private nn.modules.batchnorm._NormBase is the base class of every layer that keeps
# running statistics (BatchNorm*, SyncBatchNorm, InstanceNorm*, their Lazy forms, and subclasses
# elsewhere such as timm's BatchNormAct2d); torch has no public base class or flag for all of
# them. freeze_norm_stats puts these layers in eval mode. Checked with torch 2.14.1.
NORM_BASE_REASON = (
    "torch has no public base class of the layers that keep running statistics; the private one is "
    "torch.nn.modules.batchnorm._NormBase"
)


def keeps_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer with running statistics (BatchNorm, InstanceNorm)."""
    base = getattr(nn.modules.batchnorm, "_NormBase", None)
    if not (isinstance(base, type) and issubclass(nn.BatchNorm2d, base) and issubclass(base, nn.Module)):
        raise changed(
            "torch.nn.modules.batchnorm._NormBase", "freeze_norm_stats", NORM_BASE_REASON, package="torch"
        )
    return isinstance(module, base)


# -- torchvision's weights: the accuracy table -------------------------------------------------
# torchvision's weights record their accuracy only under the meta key "_metrics" (its underscored
# keys are what its documentation tables are made from); there is no public accessor. As
# scripts/list_backbones.py always did, absence is tolerated (weights without a table: {}).
# Checked with torchvision 0.29.1.
WEIGHTS_METRICS_REASON = (
    "torchvision's weights record their accuracy only under the meta key _metrics (e.g. "
    "['ImageNet-1K']['acc@1'])"
)


def weights_metrics(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """A torchvision ``weights.meta``'s accuracy table by data set, ``{}`` when it has none."""
    metrics = meta.get("_metrics", {})
    return metrics if isinstance(metrics, Mapping) else {}
