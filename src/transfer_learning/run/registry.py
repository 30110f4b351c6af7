"""What a file a user receives may name: the allow-lists of everything the template builds
from a checkpoint or a run folder, in one place.

The model's kinds (backbone builder, strategy, optimizer, scheduler) are listed by
:mod:`transfer_learning.model.allowed`; a run folder's ``run_config.yaml`` names its data module,
listed here. How a name is looked up and called with plain values only is
:mod:`transfer_learning.specs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from transfer_learning import specs
from transfer_learning.data.datamodule import ImageDataModule, ImageFolderDataModule
from transfer_learning.model import allowed as model_allowed


def _data() -> dict[str, Callable[..., Any]]:
    return {
        "transfer_learning.data.ImageDataModule": ImageDataModule,
        "transfer_learning.data.ImageFolderDataModule": ImageFolderDataModule,
    }


def allowed(kind: str) -> dict[str, Callable[..., Any]]:
    """``_target_`` name -> callable, for one kind of thing."""
    return _data() if kind == "data" else model_allowed.allowed(kind)


def build(kind: str, spec: Mapping[str, Any], source: str, **extra: Any) -> Any:
    """:func:`transfer_learning.specs.build` against this kind's allow-list."""
    return specs.build(kind, spec, source, allowed(kind), **extra)
