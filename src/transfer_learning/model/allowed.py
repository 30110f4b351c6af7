"""What a checkpoint may build of a model: the allow-lists of backbones, strategies,
optimizers and schedulers (the mechanism, and why, is :mod:`transfer_learning.specs`).

A backbone builder is allowed by being marked ``@backbone_builder`` in a module of
``transfer_learning.model.backbones``; a new strategy is allowed by being a
:class:`~transfer_learning.model.strategies.Strategy` subclass in an imported module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.optim.lr_scheduler as schedulers

from transfer_learning import specs
from transfer_learning.model import backbones, schedules, strategies

KINDS = ("model", "strategy", "optimizer", "scheduler")


def _backbones() -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    for name, builder in backbones.BUILDERS.items():
        found[f"transfer_learning.model.backbones.{name}"] = builder
        found[f"{builder.__module__}.{name}"] = builder
    return found


def _strategies() -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    pending = list(strategies.Strategy.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if not inspect.isabstract(cls):
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
            if getattr(strategies, cls.__qualname__, None) is cls:  # the name conf/strategy/ uses
                found[f"{strategies.__name__}.{cls.__qualname__}"] = cls
    return found


def _optimizers() -> dict[str, Callable[..., Any]]:
    return {
        f"torch.optim.{name}": cls
        for name, cls in vars(torch.optim).items()
        if inspect.isclass(cls)
        and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
    }


def _schedulers() -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {
        f"torch.optim.lr_scheduler.{name}": cls
        for name, cls in vars(schedulers).items()
        if inspect.isclass(cls)
        and issubclass(cls, schedulers.LRScheduler | schedulers.ReduceLROnPlateau)
        and cls not in (schedulers.LRScheduler, schedulers.ChainedScheduler, schedulers.SequentialLR)
    }  # (those two take scheduler objects, which plain values cannot be)
    found.update(
        {
            f"transfer_learning.model.schedules.{f.__name__}": f
            for f in (schedules.warmup_cosine, schedules.one_cycle)
        }
    )
    return found


_LISTS: dict[str, Callable[[], dict[str, Callable[..., Any]]]] = {
    "model": _backbones,
    "strategy": _strategies,
    "optimizer": _optimizers,
    "scheduler": _schedulers,
}


def allowed(kind: str) -> dict[str, Callable[..., Any]]:
    """``_target_`` name -> callable, for one kind of model setting."""
    return _LISTS[kind]()


def resolve(kind: str, spec: Any, source: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """:func:`transfer_learning.specs.resolve` against this kind's allow-list."""
    return specs.resolve(kind, spec, source, allowed(kind))


def build(kind: str, spec: Mapping[str, Any], source: str, **extra: Any) -> Any:
    """:func:`transfer_learning.specs.build` against this kind's allow-list."""
    return specs.build(kind, spec, source, allowed(kind), **extra)
