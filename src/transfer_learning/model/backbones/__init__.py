"""Backbone builders, one per source; each returns a :class:`~transfer_learning.model.network.Network`.

Every module of this folder is imported here, so a builder in a new file (marked with
:func:`~transfer_learning.model.backbones.base.backbone_builder`) is known without editing
anything else; it is then available as ``transfer_learning.model.backbones.<name>``. The three
shipped builders are the ``_target_`` of the files in ``conf/model/``:
``efficientnet_lite0`` (bundled weights, offline), ``torchvision_backbone`` and ``timm_backbone``.
"""

import importlib
import pkgutil

from transfer_learning.model.backbones.base import BUILDERS, backbone_builder
from transfer_learning.model.backbones.lite0 import LITE0_PREPROCESSING, efficientnet_lite0
from transfer_learning.model.backbones.timm_models import timm_backbone
from transfer_learning.model.backbones.torchvision_models import torchvision_backbone, torchvision_names

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
globals().update(BUILDERS)  # transfer_learning.model.backbones.<builder name>

__all__ = [
    "BUILDERS",
    "LITE0_PREPROCESSING",
    "backbone_builder",
    "efficientnet_lite0",
    "timm_backbone",
    "torchvision_backbone",
    "torchvision_names",
]
