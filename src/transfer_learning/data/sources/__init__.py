"""Data sources: which images, with which targets, in which split, and the class names.

Every module of this folder is imported by :func:`known_sources`, so a ``DataSource``
subclass dropped in as a new file is known without being registered anywhere; with one
YAML file in ``conf/data/`` naming it (``source: transfer_learning.data.sources.<module>.<Class>``)
it is a new ``data=<name>`` option.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from typing import Any

from transfer_learning.data.sources.base import DataSource, Listing
from transfer_learning.data.sources.csv import CsvSource
from transfer_learning.data.sources.imagefolder import ImageFolderSource
from transfer_learning.errors import ConfigError

__all__ = [
    "CsvSource",
    "DataSource",
    "ImageFolderSource",
    "Listing",
    "known_sources",
    "make_source",
    "source_class",
]


def known_sources() -> dict[str, type[DataSource]]:
    """Qualified class name -> class, for every concrete ``DataSource`` subclass: those in this
    folder's modules (imported here) and any other module already imported. The only way a
    config or a run folder's ``run_config.yaml`` can name a source: nothing is imported by name."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found: dict[str, type[DataSource]] = {}
    pending = list(DataSource.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if not inspect.isabstract(cls):
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def source_class(name: str) -> type[DataSource]:
    """The source ``data.source`` names: a module of this folder (``csv``), or a class's
    qualified name (``transfer_learning.data.sources.csv.CsvSource``, or a fork's own)."""
    known = known_sources()
    if name in known:
        return known[name]
    short = {
        qualified.split(".")[-2]: cls
        for qualified, cls in known.items()
        if qualified.startswith(f"{__name__}.")
    }
    if name in short:
        return short[name]
    close = difflib.get_close_matches(name, [*short, *known], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"data.source={name!r} is not a data source.{hint} Known: {', '.join(sorted(short))} (modules of "
        f"src/transfer_learning/data/sources/), or a DataSource subclass's qualified name."
    )


def make_source(name: str, settings: Mapping[str, Any]) -> DataSource:
    """The source ``name`` built from the ``data.*`` settings that are its own; a setting no
    one takes is refused with the names it could have meant."""
    cls = source_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ConfigError(
            f"data.{unknown[0]}: data.source={name} takes no such setting (it takes "
            f"{', '.join(sorted(accepted)) or 'none'}, besides the data module's own)."
        )
    return cls(**settings)
