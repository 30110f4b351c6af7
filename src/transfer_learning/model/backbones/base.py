"""The backbone seam: a builder is a function ``(num_classes, weights, **settings) -> Network``
marked with :func:`backbone_builder`. Marked builders are the ones a checkpoint may name
(:mod:`transfer_learning.run.registry`), so a fork adds a backbone source with one file in this
folder (imported by the package) and one YAML file in ``conf/model/``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

Builder = TypeVar("Builder", bound=Callable[..., Any])

# Builder name -> function, filled as the modules of this package are imported.
BUILDERS: dict[str, Callable[..., Any]] = {}


def backbone_builder(fn: Builder) -> Builder:
    """Mark ``fn`` as a backbone builder: YAML files name it as
    ``transfer_learning.model.backbones.<its name>`` (or by its own module path), and checkpoints
    that name it are rebuilt with it. The builder must rebuild the same network offline from
    ``weights=None`` plus the checkpoint's weights."""
    if BUILDERS.get(fn.__name__, fn) is not fn:
        raise ValueError(f"two backbone builders are called {fn.__name__!r}: rename one")
    BUILDERS[fn.__name__] = fn
    return fn
