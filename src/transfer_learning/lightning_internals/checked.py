"""The versions :mod:`transfer_learning.lightning_internals` was checked with, and the error
it raises when a private attribute is gone or means something else."""

from __future__ import annotations

import importlib.metadata
from collections.abc import MutableMapping
from typing import Any

from transfer_learning.errors import TransferLearningError

# The versions every function below was checked with (pyproject.toml pins them).
CHECKED = {"lightning": "2.6.6", "torch": "2.14.1", "torchvision": "0.29.1"}


class LightningInternalsChanged(TransferLearningError, RuntimeError):
    """A private attribute this template relies on is gone or means something else in the
    installed Lightning (or torch): the message names it and says what to do."""


def changed(
    attribute: str, needed_for: str, why: str, package: str = "lightning"
) -> LightningInternalsChanged:
    """The error for ``attribute`` of ``package`` that is missing or no longer what it was:
    ``needed_for`` what the template uses it, ``why`` no public API does it."""
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = "not installed"
    checked = CHECKED[package]
    return LightningInternalsChanged(
        f"{package}'s private {attribute} is missing or has changed (checked with {package} {checked}, "
        f"installed: {installed}); this template needs it for {needed_for} ({why}). "
        f"Install {package}=={checked} "
        f"(as pyproject.toml pins it), or update src/transfer_learning/lightning_internals/ (and run "
        f"tests/test_lightning_internals.py) for {package} {installed}."
    )


def private_mapping(
    owner: object, attribute: str, where: str, needed_for: str, why: str
) -> MutableMapping[str, Any]:
    """``owner``'s private ``attribute`` (live, not a copy), which must be a mutable mapping;
    else the error :func:`changed` words with ``where`` (e.g. ``"DDPStrategy._ddp_kwargs"``)."""
    value = getattr(owner, attribute, None)
    if not isinstance(value, MutableMapping):
        raise changed(where, needed_for, why)
    return value
