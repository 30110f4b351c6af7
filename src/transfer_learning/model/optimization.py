"""The optimizer and schedule a strategy asks for, and the strategy's per-group factor on top.

The strategy hands over its param groups (each with its own rate); the optimizer and the
scheduler come from the config. The strategy's factor (:meth:`Strategy.lr_scale`: gradual
unfreezing's ramps) sits on top of the schedule: each group trains at base * factor, and the
scheduler only ever sees and steps the base rates, so every torch scheduler (chainable or
closed-form) composes with it, and checkpoints keep the bases for resuming.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from transfer_learning.model import allowed
from transfer_learning.model.network import Network
from transfer_learning.model.strategies import Strategy

# Keys of the scheduler config that are Lightning's, not the scheduler's own arguments.
LIGHTNING_SCHEDULER_KEYS = ("interval", "frequency", "monitor")


class StrategyOptimization(L.LightningModule):
    """``configure_optimizers`` from ``hparams["optimizer"]`` / ``["scheduler"]`` and the
    strategy's param groups; the subclass sets ``net``, ``strategy`` and ``_trusted``."""

    net: Network
    strategy: Strategy
    _trusted: bool

    def __init__(self) -> None:
        super().__init__()
        # The scheduler's learning rate of each param group, before the strategy's factor;
        # None until the first training batch.
        self._base_lrs: list[float] | None = None
        self._saved_base_lrs: list[float] | None = None
        self._lr_progress = 0.0

    def _build(self, kind: str, _source: str = "the checkpoint", **extra: Any) -> Any:
        """Settings from the user's own config are Hydra's to build; read from a checkpoint
        (``_trusted`` False) they are data, built only from the template's allow-lists."""
        spec = self.hparams[kind]
        if self._trusted:
            return instantiate(spec, **extra)
        return allowed.build(kind, spec, _source, **extra)

    def configure_optimizers(self) -> Any:
        self._base_lrs = None  # a new optimizer (the LR finder builds its own first)
        groups = self.strategy.param_groups(self.net)
        optimizer = self._build("optimizer")(groups)
        if not (self.hparams["scheduler"] or {}).get("_target_"):  # scheduler=constant
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler(optimizer)}

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Any ``torch.optim.lr_scheduler`` class (or factory) with its own arguments, plus
        Lightning's ``interval`` (step | epoch), ``frequency`` and ``monitor``. A scheduler that
        takes ``total_steps`` and is not given one gets the run's length in its interval."""
        spec = dict(self.hparams["scheduler"])
        lightning = {k: spec.pop(k) for k in LIGHTNING_SCHEDULER_KEYS if k in spec}
        lightning.setdefault("interval", "epoch")
        factory = (
            instantiate(spec, _partial_=True)
            if self._trusted
            else allowed.build("scheduler", {**spec, "_partial_": True}, "the checkpoint")
        )
        kwargs = {}
        if "total_steps" in inspect.signature(factory).parameters and "total_steps" not in spec:
            by_step = lightning["interval"] == "step"
            total = self.trainer.estimated_stepping_batches if by_step else self.trainer.max_epochs
            kwargs["total_steps"] = int(total or 0)
        return {"scheduler": factory(optimizer, **kwargs), **lightning}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._scale_lrs(self._progress(batch_idx))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer and scheduler steps: the next batch's rates, so that the learning
        # rate monitor (which logs before this module's batch hook) shows what the step will use.
        self._scale_lrs(self._progress(batch_idx + 1))

    def _progress(self, batch_idx: int) -> float:
        batches = self.trainer.num_training_batches
        fraction = batch_idx / batches if batches and math.isfinite(batches) else 0.0
        return self.current_epoch + fraction

    def _lr_groups(self) -> list[dict[str, Any]] | None:
        if not self.strategy.changes_what_trains or not self.trainer.optimizers:
            return None  # no factors: the optimizer's rates are the schedule's
        groups = self.trainer.optimizers[0].param_groups
        if self._base_lrs is None:
            saved, self._saved_base_lrs = self._saved_base_lrs, None
            self._base_lrs = saved if saved and len(saved) == len(groups) else [g["lr"] for g in groups]
        return groups

    def _scale_lrs(self, progress: float) -> None:
        groups = self._lr_groups()
        if groups is None:
            return
        self._lr_progress = progress
        assert self._base_lrs is not None
        for group, base in zip(groups, self._base_lrs, strict=True):
            group["lr"] = base * self.strategy.lr_scale(group["name"], progress)

    @contextlib.contextmanager
    def _unscaled_lrs(self) -> Iterator[None]:
        groups = self._lr_groups()
        if groups is None:
            yield
            return
        assert self._base_lrs is not None
        for group, base in zip(groups, self._base_lrs, strict=True):
            group["lr"] = base
        yield
        self._base_lrs = [g["lr"] for g in groups]
        self._scale_lrs(self._lr_progress)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        with self._unscaled_lrs():
            super().lr_scheduler_step(scheduler, metric)

    def save_base_lrs(self, checkpoint: dict[str, Any]) -> None:
        if self._base_lrs is not None:  # the optimizer state holds base * factor
            checkpoint["base_lrs"] = list(self._base_lrs)

    def load_base_lrs(self, checkpoint: dict[str, Any]) -> None:
        self._saved_base_lrs = checkpoint.get("base_lrs")
