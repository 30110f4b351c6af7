"""Building what a file names, as data: an allow-list per kind of thing and plain values.

A checkpoint names its backbone builder, strategy, optimizer and scheduler by ``_target_``, and a
run folder's ``run_config.yaml`` names its data module. Built from the user's own command line
and ``conf/``, those names go to Hydra as usual. Read from a file, they are *data*: each is
looked up in the allow-list of its kind and called with plain keyword values; nothing is
imported by name, no nested ``_target_`` is followed, and anything else is refused. A crafted
``_target_: torch.load`` (or ``builtins.open``, ``shutil.copyfile``...) runs nothing.

This module is the mechanism; the lists are where the things live:
:mod:`transfer_learning.model.allowed` (backbones, strategies, optimizers, schedulers) and
:mod:`transfer_learning.run.registry` (those and the data modules).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from transfer_learning.errors import TransferLearningError

# Hydra's keys that change what instantiate does; only _target_ and _partial_ are understood here.
HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
# Checkpoints written before the package was grouped by stage (data, model, run, results) name
# their builders by the old module paths: the same allowed things, under their old names.
_MOVED = {
    "transfer_learning.backbones.": "transfer_learning.model.backbones.",
    "transfer_learning.strategies.": "transfer_learning.model.strategies.",
    "transfer_learning.module.": "transfer_learning.model.module.",
    # The schedules left the LightningModule's file for their own (applied after the line above).
    "transfer_learning.model.module.warmup_cosine": "transfer_learning.model.schedules.warmup_cosine",
    "transfer_learning.model.module.one_cycle": "transfer_learning.model.schedules.one_cycle",
}


def current_name(target: Any) -> Any:
    """A ``_target_`` from before a re-layout under its name today (others unchanged); the
    moves apply in order, so a name that moved twice arrives where it is now."""
    if isinstance(target, str):
        for old, new in _MOVED.items():
            if target.startswith(old):
                target = new + target[len(old) :]
    return target


class UnsafeSpecError(TransferLearningError, RuntimeError):
    """A file names something the template does not build, or passes it more than plain values."""


def check_plain(value: Any, where: str, source: str) -> None:
    """Only numbers, strings, booleans, None, and lists and string-keyed mappings of those;
    no Hydra key (a nested ``_target_`` would be another object to build)."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]", source)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or key in HYDRA_KEYS:
                raise UnsafeSpecError(
                    f"refusing {source}: {where} holds the key {key!r}; a file may hold plain values "
                    "only, never another object to build."
                )
            check_plain(item, f"{where}.{key}", source)
        return
    raise UnsafeSpecError(
        f"refusing {source}: {where} holds a {type(value).__name__}; a file may hold plain values only."
    )


def resolve(
    kind: str, spec: Any, source: str, known: Mapping[str, Callable[..., Any]]
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The callable of ``known`` (a kind's allow-list: ``_target_`` name -> callable) that a
    file's ``spec`` names, and its plain keyword arguments (checked, not called).
    ``_partial_: true`` is kept as a ``functools.partial`` by :func:`build`."""
    if not isinstance(spec, Mapping):
        raise UnsafeSpecError(
            f"refusing {source}: its {kind} settings are a {type(spec).__name__}, not a mapping."
        )
    target = current_name(spec.get("_target_"))
    if not isinstance(target, str) or target not in known:
        raise UnsafeSpecError(
            f"refusing {source}: its {kind} names _target_={target!r}, which is not one of the template's "
            f"own ({', '.join(sorted(known))}). Files a run receives are data: only those are built from "
            "them. Use a checkpoint this template wrote (or retrain with your own code)."
        )
    kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "_partial_")}
    check_plain(kwargs, kind, source)
    partial = spec.get("_partial_", False)
    if not isinstance(partial, bool):
        raise UnsafeSpecError(f"refusing {source}: {kind}._partial_ must be true or false.")
    return known[target], kwargs


def build(
    kind: str, spec: Mapping[str, Any], source: str, known: Mapping[str, Callable[..., Any]], **extra: Any
) -> Any:
    """Call the allowed callable ``spec`` names with its plain values (and ``extra``)."""
    factory, kwargs = resolve(kind, spec, source, known)
    try:
        if spec.get("_partial_"):
            inspect.signature(factory).bind_partial(**kwargs, **extra)
            return functools.partial(factory, **kwargs, **extra)
        return factory(**kwargs, **extra)
    except TypeError as exc:
        raise UnsafeSpecError(
            f"refusing {source}: its {kind} settings do not fit {spec['_target_']} ({exc})."
        ) from exc
