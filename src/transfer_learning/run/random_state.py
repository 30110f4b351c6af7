"""Exact resumes: the random number generators, and the batch order of an interrupted epoch."""

from __future__ import annotations

import logging
import random
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from transfer_learning.errors import CheckpointError
from transfer_learning.lightning_internals import fit_batch_iterator

log = logging.getLogger(__name__)


def _rng_state() -> dict[str, Any]:
    """torch (and CUDA), NumPy and Python random states, as tensors and plain values only."""
    import numpy as np

    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    version, python_state, python_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "position": position,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": {"version": version, "state": list(python_state), "gauss": python_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def checked_state(state_dict: Any) -> dict[str, Any]:
    """A checkpoint's :class:`RandomState` state, in today's shape, once each generator state
    in it has been put in (the last one stays); a damaged one raises :class:`CheckpointError`."""
    if isinstance(state_dict, dict) and "now" not in state_dict:  # from before the replay
        state_dict = {"now": state_dict, "epoch_start": state_dict, "replay": 0}
    try:
        replay = state_dict.get("replay", 0)
        if isinstance(replay, bool) or not isinstance(replay, int) or replay < 0:
            raise TypeError(f"replay is {replay!r}, not a batch count")
        _set_rng_state(state_dict["now"])
        _set_rng_state(state_dict["epoch_start"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            "the checkpoint's random number states (callbacks.RandomState) are damaged "
            f"({type(exc).__name__}: {str(exc)[:200]}): resume from another checkpoint of the run, "
            "or start a new run without ckpt_path."
        ) from None
    return state_dict


def check_saved_state(checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint whose random number states cannot be put back, before anything of
    the run is written; this process's generators are left as they were."""
    state = (checkpoint.get("callbacks") or {}).get(RandomState.__qualname__)
    if state is None:
        return
    now = _rng_state()
    try:
        checked_state(state)
    finally:
        _set_rng_state(now)


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))  # fmt: skip
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomState(Callback):
    """Exact resumes. Every checkpoint carries the random number generator states (torch,
    CUDA, NumPy, Python) at two points: where the run stood (``now``), and where its current
    epoch drew its batches from (``epoch_start``: the shuffle, and the seeds of the loader
    worker processes, which the data module starts afresh each epoch). A run resumed at an
    epoch's end simply goes on from there. A run resumed in the middle of an epoch (SIGTERM)
    draws that epoch's batches again from ``epoch_start``, skips the ``replay`` batches it had
    trained on, and goes on from ``now``: the same batches, augmentations and dropout as the
    uninterrupted run, which it therefore ends with the weights of. Skipping costs loading
    those batches once more (no training step). Lightning also leaves out, on resuming, the
    epoch-end step of schedulers that watch a metric (ReduceLROnPlateau): it is taken here.
    Stored as tensors and numbers only (the checkpoint stays loadable with
    ``weights_only=True``)."""

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._epoch_start: dict[str, Any] | None = None
        self._in_epoch = False
        self._drew = False  # a training batch was drawn in this fit
        self._resume: dict[str, Any] | None = None
        self._plateau_stepped = False
        self._resumed_mid_epoch = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit":
            self._drew = False
            self._epoch_start = _rng_state()

    def state_dict(self) -> dict[str, Any]:
        now = _rng_state()
        trainer = self._trainer
        if trainer is not None and self._in_epoch and self._epoch_start is not None:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            if done < trainer.num_training_batches:  # inside an epoch: a resumed run goes on with it
                return {"now": now, "epoch_start": self._epoch_start, "replay": done}
        return {"now": now, "epoch_start": now, "replay": 0, "plateau": self._plateau_pending()}

    def _plateau_pending(self) -> dict[str, float]:
        """Saved at an epoch's end (by ModelCheckpoint) before Lightning steps the schedulers
        that watch a metric (ReduceLROnPlateau): their metrics, for the resumed run to take
        that step, which Lightning leaves out (it keeps no metrics in checkpoints)."""
        trainer = self._trainer
        if trainer is None or self._plateau_stepped:
            return {}
        progress = trainer.fit_loop.epoch_progress.current  # a _ProcessedTracker
        if getattr(progress, "processed", 0) <= progress.completed:
            return {}
        configs = [c for c in trainer.lr_scheduler_configs if c.reduce_on_plateau and c.interval == "epoch"]
        metrics = trainer.callback_metrics
        return {c.monitor: float(metrics[c.monitor]) for c in configs if c.monitor in metrics}

    @staticmethod
    def _step_plateau(trainer: L.Trainer, pl_module: L.LightningModule, values: dict[str, float]) -> None:
        """The epoch's step of the schedulers that watch a metric, as Lightning takes it."""
        for config in trainer.lr_scheduler_configs:
            if not (config.reduce_on_plateau and config.interval == "epoch" and config.monitor in values):
                continue
            if (trainer.current_epoch + 1) % config.frequency == 0:
                pl_module.lr_scheduler_step(config.scheduler, torch.tensor(values[config.monitor]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = checked_state(state_dict)  # (the epoch-start states are put in)
        self._resume = state_dict
        self._epoch_start = state_dict["epoch_start"]

    # The first epoch of a fit draws its batches from a loader iterator made while the fit is
    # set up (for the optimizer's step count) or, at the latest, right after the sanity check:
    # until it is made, the state it will draw from is put back (resuming) or noted (not).

    def _before_first_iterator(self, trainer: L.Trainer) -> None:
        if trainer.train_dataloader is not None:  # set up, with its iterator (FitLoop.setup_data)
            return
        if self._resume is not None:
            _set_rng_state(self._resume["epoch_start"])
        else:
            self._epoch_start = _rng_state()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_first_iterator(trainer)

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_first_iterator(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resume, self._resume = self._resume, None
        if resume is not None and resume.get("plateau"):  # the finished epoch's last step
            self._step_plateau(trainer, pl_module, resume["plateau"])
        if resume is None or not trainer.fit_loop.restarted_mid_epoch:
            return
        # Lightning goes on with the interrupted epoch without its epoch-start hooks: the
        # module sets up what this epoch trains (and which cached view it reads) again.
        self._in_epoch = self._resumed_mid_epoch = True
        pl_module.on_train_epoch_start()
        replay = int(resume.get("replay", 0))
        # Lightning warns that a loader without its own state cannot resume mid-epoch: this does it.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
        if replay and self._skip(trainer, replay):
            _set_rng_state(resume["now"])

    @staticmethod
    def _skip(trainer: L.Trainer, count: int) -> bool:
        """Draw (and drop) the first ``count`` batches of the epoch's loader iterator."""
        iterator = fit_batch_iterator(trainer)
        if iterator is None:
            log.warning("Resuming mid-epoch: cannot replay the epoch's data order; this epoch draws "
                        "other batches than the uninterrupted run did.")  # fmt: skip
            return False
        started = time.monotonic()
        for _ in range(count):
            next(iterator)
        log.info(
            "Resumed in the middle of epoch %d: drew its first %d batches again, in the same order, "
            "and skipped them (%.1f s)", trainer.current_epoch, count, time.monotonic() - started,
        )  # fmt: skip
        return True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_epoch = True
        self._resumed_mid_epoch = self._plateau_stepped = False
        # The first epoch of a fit draws from the loader iterator made before this hook (see
        # above); every later epoch makes its iterator right after it.
        if self._drew:
            self._epoch_start = _rng_state()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._drew = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # e.g. the learning-rate finder's sweep, which restores its start
            self._resume, self._in_epoch = None, False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_epoch = False
        if self._resumed_mid_epoch and trainer.fit_loop.restarting:
            # Lightning skips this step at the end of the epoch it resumed in; taken here,
            # before the epoch's checkpoint (which then needs no step on resuming).
            self._step_plateau(trainer, pl_module, {k: float(v) for k, v in trainer.callback_metrics.items()})
            self._plateau_stepped = True
