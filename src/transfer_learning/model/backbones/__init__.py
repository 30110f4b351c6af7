"""Backbone builders, one per source; each returns a :class:`~transfer_learning.model.network.Network`.

These three names are the ``_target_`` of the files in ``conf/model/``:
``transfer_learning.model.backbones.efficientnet_lite0`` (bundled weights, offline),
``transfer_learning.model.backbones.torchvision_backbone`` and
``transfer_learning.model.backbones.timm_backbone``.
"""

from transfer_learning.model.backbones.lite0 import LITE0_PREPROCESSING, efficientnet_lite0
from transfer_learning.model.backbones.timm_models import timm_backbone
from transfer_learning.model.backbones.torchvision_models import torchvision_backbone, torchvision_names

# The builders a checkpoint may name (transfer_learning.run.registry): a fork adds its own here.
BUILDERS = ("efficientnet_lite0", "torchvision_backbone", "timm_backbone")

__all__ = [
    "BUILDERS",
    "LITE0_PREPROCESSING",
    "efficientnet_lite0",
    "timm_backbone",
    "torchvision_backbone",
    "torchvision_names",
]
