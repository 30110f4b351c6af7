"""Transfer-learning strategies: what trains, at which learning rate, and in which mode.

Every param group is built up front from the backbone/head split, so the optimizer, its
schedule and DDP see the same groups from the first step to the last. Strategies that change
what trains during a run (``gradual_unfreeze``) do it by epoch, from the epoch number alone, so a
resumed run is in the same state as one that never stopped.

What a strategy needs from the rest of the template it declares through the hooks of
:class:`Strategy` (cached features to train on, features for a step before fit, that step, the
learning rates the LR finder scales, the data's loss weights): the build path
(:func:`transfer_learning.run.config.build`) and the LightningModule only ask these hooks, so a
new strategy is one subclass plus one YAML file in ``conf/strategy/``.

The built-in strategies live in one module each; every module of this package is imported with
it, so a fork's strategy in a new module here is found (and allowed in checkpoints, see
:mod:`transfer_learning.run.registry`) without being listed anywhere.
"""

from __future__ import annotations

import importlib
import pkgutil

from transfer_learning.model.strategies.base import FeatureRequest, Split, Strategy, split_decay
from transfer_learning.model.strategies.feature_extraction import FeatureExtraction
from transfer_learning.model.strategies.finetuning import FineTuning, LayerDecay
from transfer_learning.model.strategies.gradual_unfreeze import GradualUnfreeze
from transfer_learning.model.strategies.lp_ft import LinearProbeFineTune, fit_linear_head

__all__ = [
    "FeatureExtraction",
    "FeatureRequest",
    "FineTuning",
    "GradualUnfreeze",
    "LayerDecay",
    "LinearProbeFineTune",
    "Split",
    "Strategy",
    "fit_linear_head",
    "split_decay",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
