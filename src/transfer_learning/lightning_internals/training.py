"""Private state of Lightning's trainer, loops and strategies: the SIGTERM flag, the batches
already trained on, the logging step, DDP's kwargs and workers' command, the initial hparams,
the learning-rate finder, weight averaging's averaged model."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from transfer_learning.lightning_internals.checked import changed, private_mapping

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateFinder, WeightAveraging
    from lightning.pytorch.strategies import DDPStrategy
    from torch.optim.swa_utils import AveragedModel

log = logging.getLogger(__name__)


# -- SIGTERM: the trainer's flag ---------------------------------------------------------------
# Public: Trainer.received_sigterm, read-only. Setting it back (a validation under way finishes
# before training stops) and on again (training stops at its next check) has no public API: the
# flag is an attribute of the trainer's private _SignalConnector, which Lightning's SIGTERM handler
# sets and its loops read. Checked with Lightning 2.6.6.
SIGTERM_FLAG_REASON = (
    "Trainer.received_sigterm is read-only; the flag a validation under way clears (and sets again "
    "after it) is trainer._signal_connector.received_sigterm, which Lightning's loops read"
)


def set_received_sigterm(trainer: L.Trainer, value: bool) -> None:
    """Set what ``trainer.received_sigterm`` says (Lightning's loops stop at the next check when True)."""
    connector: Any = getattr(trainer, "_signal_connector", None)
    if not isinstance(getattr(connector, "received_sigterm", None), bool):
        raise changed(
            "Trainer._signal_connector.received_sigterm",
            "finishing a validation on SIGTERM",
            SIGTERM_FLAG_REASON,
        )
    connector.received_sigterm = value
    if trainer.received_sigterm is not value:
        raise changed(
            "Trainer._signal_connector.received_sigterm (behind Trainer.received_sigterm)",
            "finishing a validation on SIGTERM",
            SIGTERM_FLAG_REASON,
        )


# -- exact mid-epoch resumes: the batches already trained on ----------------------------------
# The iterator the fit loop draws the current epoch's training batches from, for a resumed run
# to draw (and drop) the batches trained on before it stopped. No public API hands it out: it is
# the .iterator of the fit loop's private _data_fetcher, which may also hold batches it fetched
# ahead (.batches: the iterator is then ahead of the loop). As RandomState always did, absence is
# tolerated (None: the resumed epoch draws other batches, with a warning). Checked with Lightning
# 2.6.6. (Whether that iterator exists yet has a public answer: trainer.train_dataloader is set
# together with it, in FitLoop.setup_data.)
DATA_FETCHER_REASON = (
    "no public API hands out the iterator the fit loop draws an epoch's training batches from: "
    "it is trainer.fit_loop._data_fetcher.iterator (with .batches fetched ahead of it)"
)


def fit_batch_iterator(trainer: L.Trainer) -> Iterator[Any] | None:
    """The iterator of the current epoch's training batches, or None when there is none to draw
    from exactly (not made, batches fetched ahead of it, or Lightning keeps it elsewhere)."""
    loop = trainer.fit_loop
    if not hasattr(loop, "_data_fetcher"):
        log.warning(
            "%s",
            changed(
                "FitLoop._data_fetcher", "replaying the batch order of a resumed epoch", DATA_FETCHER_REASON
            ),
        )
    fetcher = getattr(loop, "_data_fetcher", None)
    iterator = getattr(fetcher, "iterator", None)
    if iterator is None or getattr(fetcher, "batches", None):
        return None
    return iterator


# -- resuming after a mid-epoch validation: the logging step ----------------------------------
# A checkpoint saved right after a validation in the middle of an epoch is saved as one that
# ModelCheckpoint saves during that validation: one logging step fewer. That count (the step
# loggers are given, TrainingEpochLoop._batches_that_stepped) is stored under the private key
# "_batches_that_stepped" of the checkpoint's loops/fit_loop/"epoch_loop.state_dict"; no public
# API sets it. Checked with Lightning 2.6.6.
LOGGING_STEP_REASON = (
    "the logging step a resumed run goes on from is stored only under the private checkpoint key "
    "loops/fit_loop/epoch_loop.state_dict/_batches_that_stepped"
)


def uncount_logging_step(checkpoint: dict[str, Any]) -> None:
    """One logging step fewer in a checkpoint being saved (see above)."""
    try:
        state = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
        count = state["_batches_that_stepped"]
    except (KeyError, TypeError):
        count = None
    if isinstance(count, bool) or not isinstance(count, int):
        raise changed(
            "checkpoint key loops/fit_loop/epoch_loop.state_dict/_batches_that_stepped",
            "saving a resumable checkpoint right after a mid-epoch validation",
            LOGGING_STEP_REASON,
        )
    state["_batches_that_stepped"] = count - 1


# -- DDP: find_unused_parameters once the model is known ---------------------------------------
# The keyword arguments DDPStrategy hands DistributedDataParallel when it wraps the model (after
# LightningModule.setup), for find_unused_parameters=True when the transfer strategy freezes by
# epoch. Public only when the strategy is made (DDPStrategy(find_unused_parameters=True),
# trainer.strategy=ddp_find_unused_parameters_true), from the trainer config, before the module
# knows what it freezes; afterwards they are the private DDPStrategy._ddp_kwargs. Checked with
# Lightning 2.6.6.
DDP_KWARGS_REASON = (
    "DDPStrategy takes DistributedDataParallel's arguments only when it is made; after that they are "
    "its private _ddp_kwargs, read when it wraps the model after LightningModule.setup"
)


def ddp_kwargs(strategy: DDPStrategy) -> MutableMapping[str, Any]:
    """The (live) keyword arguments ``strategy`` will make DistributedDataParallel with."""
    return private_mapping(
        strategy,
        "_ddp_kwargs",
        "DDPStrategy._ddp_kwargs",
        "find_unused_parameters=True with a strategy that freezes by epoch",
        DDP_KWARGS_REASON,
    )


# -- the learning-rate finder -------------------------------------------------------------------
# LightningModule.hparams_initial (public) is a read-only deep copy of what save_hyperparameters
# saved, which loggers are given when fit starts. A value changed after __init__ (the finder's
# rates) reaches them only through the private _hparams_initial it copies (save_hyperparameters
# again would save every current hyperparameter anew). Checked with Lightning 2.6.6.
HPARAMS_INITIAL_REASON = (
    "LightningModule.hparams_initial, which loggers get when fit starts, is a read-only copy of the "
    "private _hparams_initial"
)


def set_initial_hparam(module: L.LightningModule, key: str, value: Any) -> None:
    """``module.hparams_initial[key] = value``; nothing when no such hyperparameter was saved."""
    if key not in module.hparams_initial:
        return
    initial = private_mapping(
        module,
        "_hparams_initial",
        "LightningModule._hparams_initial",
        "logging the learning rates the LR finder chose",
        HPARAMS_INITIAL_REASON,
    )
    initial[key] = value
    if module.hparams_initial.get(key) != value:
        raise changed(
            "LightningModule._hparams_initial (behind hparams_initial)",
            "logging the learning rates the LR finder chose",
            HPARAMS_INITIAL_REASON,
        )


# Tuner.lr_find runs Lightning's LearningRateFinder as a fit that ends once the sweep is done (the
# weights put back): it sets the callback's private _early_exit, with which lr_find raises the
# private _TunerExitException that the Trainer takes as a clean end of that fit. The public
# callback alone would go on training after the sweep, and Tuner.lr_find cannot size the sweep
# when the fit starts (as run/lr_finder.py's finder does). Checked with Lightning 2.6.6.
EARLY_EXIT_REASON = (
    "only the private LearningRateFinder._early_exit (set by Tuner.lr_find) ends the fit once the "
    "sweep is done"
)


def end_fit_after_sweep(finder: LearningRateFinder) -> None:
    """Make the fit ``finder`` runs in end once its sweep is done, as ``Tuner.lr_find`` does."""
    if not isinstance(getattr(finder, "_early_exit", None), bool):
        raise changed(
            "LearningRateFinder._early_exit", "ending the LR finder's fit after its sweep", EARLY_EXIT_REASON
        )
    finder._early_exit = True


# The number of steps LearningRateFinder sweeps, set when the fit starts and the run's length is
# known: public only as its constructor's num_training_steps, made before that; lr_find reads the
# private _num_training_steps. Checked with Lightning 2.6.6.
SWEEP_STEPS_REASON = (
    "the LR finder's step count is public only in its constructor; lr_find reads the private "
    "LearningRateFinder._num_training_steps"
)


def set_sweep_steps(finder: LearningRateFinder, steps: int) -> None:
    """Sweep ``steps`` steps (before ``finder.lr_find`` runs)."""
    current = getattr(finder, "_num_training_steps", None)
    if isinstance(current, bool) or not isinstance(current, int):
        raise changed(
            "LearningRateFinder._num_training_steps",
            "sizing the LR finder's sweep to the run",
            SWEEP_STEPS_REASON,
        )
    finder._num_training_steps = steps


# -- DDP inside a Hydra multirun job: the workers' command --------------------------------------
# Lightning starts a DDP run's other processes by running the command line again; under Hydra
# it makes that command with the private _hydra_subprocess_cmd(local_rank) -> (command, cwd),
# looked up by name in lightning.pytorch.strategies.launchers.subprocess_script when it launches.
# A multirun job replaces it so that its workers run that job's overrides in its folder; Lightning
# has no public hook for the workers' command. Checked with Lightning 2.6.6.
WORKER_COMMAND_REASON = (
    "Lightning makes a DDP worker's command line under Hydra with the private "
    "subprocess_script._hydra_subprocess_cmd(local_rank), and has no public hook for it"
)


@contextmanager
def ddp_worker_command(command: Callable[[int], tuple[Sequence[str], str]]) -> Iterator[None]:
    """While the block runs, Lightning starts DDP workers (under Hydra) with ``command(local_rank)``,
    which returns their command line and working directory."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    original = getattr(subprocess_script, "_hydra_subprocess_cmd", None)
    if not callable(original) or list(inspect.signature(original).parameters) != ["local_rank"]:
        raise changed(
            "lightning.pytorch.strategies.launchers.subprocess_script._hydra_subprocess_cmd",
            "starting the DDP workers of a multirun job with that job's overrides",
            WORKER_COMMAND_REASON,
        )
    subprocess_script._hydra_subprocess_cmd = command  # type: ignore[assignment]
    try:
        yield
    finally:
        subprocess_script._hydra_subprocess_cmd = original


# -- weight averaging: the averaged model ------------------------------------------------------
# Lightning's WeightAveraging keeps the averaged copy of the module in the private _average_model
# (a torch AveragedModel, made when fit sets up); no public API hands it out. EMA sets its avg_fn
# once the decay is known (when training starts: the steps per epoch). Checked with Lightning 2.6.6.
AVERAGE_MODEL_REASON = (
    "WeightAveraging keeps its AveragedModel in the private _average_model, made when fit sets up, "
    "and no public API hands it out"
)


def averaged_model(callback: WeightAveraging) -> AveragedModel:
    """The AveragedModel ``callback`` averages into (from its ``setup`` of a fit on)."""
    from torch.optim.swa_utils import AveragedModel

    model = getattr(callback, "_average_model", None)
    if not isinstance(model, AveragedModel):
        raise changed(
            "WeightAveraging._average_model",
            "setting the EMA decay when training starts",
            AVERAGE_MODEL_REASON,
        )
    return model
