"""Weight averaging (``callbacks=ema``, ``callbacks=swa``): Lightning's ``WeightAveraging``
callbacks, with the one change this template's runs need.

Lightning keeps an averaged copy of the module next to the one being trained, swaps it in for
every validation (so the best checkpoint is picked by the averaged weights' score), writes it as
the checkpoint's ``state_dict`` (the weights being trained go to ``current_model_state``, so a
resume continues both) and copies it into the module when training ends. What it also does is
load ``current_model_state`` back into the module whenever a checkpoint is restored while the
callback holds an average, which includes ``trainer.test(ckpt_path=best)`` after fit: the test
would then run on the un-averaged weights. Here a restore outside fitting leaves the module with
the checkpoint's ``state_dict``, the averaged weights, which are also what eval, predict and
export load.

* :class:`EMA`: exponential moving average after every optimizer step (``decay``, or the decay
  of a ``half_life_epochs`` half-life; from ``update_starting_at_step``).
* :class:`SWA`: the equal-weight average of the weights at the end of each epoch from
  ``swa_epoch_start`` on (an epoch number, or a fraction of ``trainer.max_epochs``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_avg_fn

from transfer_learning.errors import ConfigError
from transfer_learning.lightning_internals import averaged_model


class _AveragedCheckpoints(WeightAveraging):
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # test / validate / predict: the checkpoint's state_dict is the average
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def describe(self) -> str:
        raise NotImplementedError


class EMA(_AveragedCheckpoints, EMAWeightAveraging):
    """Exponential moving average of the weights (and BatchNorm statistics), updated after
    every optimizer step. ``decay`` per step; or, when it is None, the decay that halves an
    update's weight in ``half_life_epochs`` epochs (small data sets take few steps per epoch, and
    Lightning's 0.999 would then keep the first step's weights for the whole run)."""

    def __init__(
        self,
        decay: float | None = None,
        half_life_epochs: float = 0.5,
        update_starting_at_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        if decay is not None and not 0 < decay < 1:
            raise ConfigError(
                f"callbacks.weight_averaging.decay={decay}: a number between 0 and 1, e.g. 0.999."
            )
        if decay is None and not half_life_epochs > 0:
            raise ConfigError(
                f"callbacks.weight_averaging.half_life_epochs={half_life_epochs}: a positive number "
                "of epochs."
            )
        super().__init__(decay=decay or 0.999, update_starting_at_step=update_starting_at_step, **kwargs)
        self.decay = decay
        self.half_life_epochs = half_life_epochs

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.decay is None:  # the steps per epoch are known now (also on a resume: the same value)
            steps = max(1, int(trainer.num_training_batches) // max(1, trainer.accumulate_grad_batches))
            self.decay = 0.5 ** (1 / (self.half_life_epochs * steps))
        averaged_model(self).avg_fn = get_ema_avg_fn(decay=self.decay)
        super().on_train_start(trainer, pl_module)

    def describe(self) -> str:
        return f"EMA (decay {self.decay:.4f} per step): the checkpoints hold the averaged weights"


class SWA(_AveragedCheckpoints):
    """Stochastic weight averaging: the mean of the weights at the end of each epoch from
    ``swa_epoch_start`` on (an int: that epoch, counted from 0; a float in (0, 1): that
    fraction of ``max_epochs``)."""

    def __init__(self, swa_epoch_start: int | float = 0.75, **kwargs: Any) -> None:
        if isinstance(swa_epoch_start, bool) or not (
            (isinstance(swa_epoch_start, int) and swa_epoch_start >= 0)
            or (isinstance(swa_epoch_start, float) and 0 < swa_epoch_start < 1)
        ):
            raise ConfigError(
                f"callbacks.weight_averaging.swa_epoch_start={swa_epoch_start}: an epoch (0, 1, ...) or a "
                "fraction of trainer.max_epochs in (0, 1), e.g. 0.75."
            )
        super().__init__(**kwargs)
        self.swa_epoch_start = swa_epoch_start
        self.start_epoch = swa_epoch_start if isinstance(swa_epoch_start, int) else 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(self.swa_epoch_start, float):
            epochs = int(trainer.max_epochs or 1)
            self.start_epoch = min(epochs - 1, max(0, math.floor(self.swa_epoch_start * epochs)))
        super().setup(trainer, pl_module, stage)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return epoch_idx is not None and epoch_idx >= self.start_epoch

    def describe(self) -> str:
        return (
            f"SWA (mean of the weights at the end of each epoch from epoch {self.start_epoch}): "
            "the checkpoints hold the averaged weights"
        )


def weight_averaging(trainer: L.Trainer) -> str | None:
    """The summary's line for the run's weight averaging, or None without it."""
    found = [c for c in trainer.callbacks if isinstance(c, _AveragedCheckpoints)]  # type: ignore[attr-defined]
    return found[0].describe() if found else None
