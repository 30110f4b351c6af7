"""SIGTERM (how SLURM and spot instances preempt) and Ctrl-C (SIGINT) in any phase of a run.

:class:`SaveOnPreemption` stops a run with :class:`Preempted` (exit code 143; 130 for Ctrl-C)
instead of Lightning's silent exit code 0 (for Ctrl-C: exit code 1 and no word of a
checkpoint): during training after saving a resumable ``last.ckpt`` (a validation under way is
finished first), before or after training saying which checkpoint to go on from.
The loaders' worker processes stay alive until the main process has saved
(:func:`transfer_learning.data.loaders.loader_worker_init`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transfer_learning.lightning_internals import set_received_sigterm, uncount_logging_step
from transfer_learning.run.checkpoints import checkpoint_folder
from transfer_learning.run.resume import run_folder_of

log = logging.getLogger(__name__)


SIGTERM_EXIT_CODE, SIGINT_EXIT_CODE = 143, 130  # 128 + the signal's number, as shells report it


class Preempted(Exception):
    """The run was stopped by SIGTERM or Ctrl-C; the message says in which phase, what was saved
    and how to go on (``train.py`` exits with :attr:`exit_code`: 143, or 130 for Ctrl-C)."""

    def __init__(
        self,
        checkpoint: str | None,
        when: str = "",
        what: str = "",
        then: str = "",
        interrupted: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.exit_code = SIGINT_EXIT_CODE if interrupted else SIGTERM_EXIT_CODE
        what = what or (
            f"saved a resumable checkpoint: {checkpoint}" if checkpoint else "no checkpoint could be saved"
        )
        # In its run folder a checkpoint resumes with the run's own settings (run.resume).
        same = "" if checkpoint and run_folder_of(Path(checkpoint)) else "<same overrides> "
        resume = f"\nResume with: python train.py {same}ckpt_path={checkpoint}{then}" if checkpoint else ""
        when = f" {when}" if when else ""
        by = "Ctrl-C (SIGINT)" if interrupted else "SIGTERM (preemption or a scheduler's time limit)"
        super().__init__(f"stopped by {by}{when}; {what}{resume}")


class SaveOnPreemption(Callback):
    """SIGTERM anywhere in a run: save what can be saved, say so, and end the run with
    :class:`Preempted` (exit code 143) instead of Lightning's silent exit code 0.

    :meth:`handling_sigterm` holds a SIGTERM handler for the whole run. Outside Lightning's own
    handling (building the data and the model, the report) it stops the run at once (the loader
    workers leave the stopping to the main process:
    :func:`~transfer_learning.data.loaders.loader_worker_init`). Inside
    ``trainer.fit`` and ``trainer.test`` Lightning notes the signal and its loops stop at the
    next batch; as a callback this class then saves ``last.ckpt`` at the interrupted step of
    training (which :class:`RandomState` resumes exactly), and lets a validation under way finish
    first, so that its checkpoint is the epoch's end (resuming in the middle of a validation,
    Lightning would skip it). :meth:`check` catches a signal that came after Lightning's last
    look, and :meth:`preempted` is the error that says what happened and how to go on.

    ``train.py`` sets :attr:`training` right before its real ``trainer.fit``: the learning-rate
    finder's sweep before it is no training to save.
    """

    def __init__(self, resumed_from: str | None = None) -> None:
        self.saved: str | None = None
        self.received = False
        self.resumed_from = resumed_from
        self.training = False
        # setup (before training) -> training -> trained -> test -> report
        self.phase = "setup"
        self._folder: Path | None = None
        self._finishing_validation = False
        self._handler: Callable[[int, FrameType | None], None] | None = None
        self.interrupted = False  # the signal was Ctrl-C (SIGINT), handled as SIGTERM
        self._pid = os.getpid()
        self._logged = False
        self._epoch, self._in_epoch = 0, False
        self._validated = False  # a validation ran after the last training batch
        self._saving_after_validation = False

    # -- the signal -------------------------------------------------------------------------

    @contextmanager
    def handling_sigterm(self) -> Iterator[None]:
        """SIGTERM and SIGINT handled as this class says while the block runs (in the main
        thread; other threads cannot set signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._pid = os.getpid()
        self._handler = self._on_sigterm
        previous = signal.signal(signal.SIGTERM, self._handler)
        previous_int = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:  # None: a handler set outside Python, which cannot be put back; the default then
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            signal.signal(
                signal.SIGINT, previous_int if previous_int is not None else signal.default_int_handler
            )

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        """Ctrl-C: the same stop as SIGTERM (save ``last.ckpt``, say how to resume); a second
        Ctrl-C stops at once."""
        if os.getpid() != self._pid:
            return
        if self.interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.interrupted = True
        log.warning(
            "Ctrl-C: stopping at the next step and saving what can be saved (Ctrl-C again: quit at once)"
        )
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler or this class's, as for SIGTERM

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked child that inherited the handler: not its call
            return
        first, self.received = not self.received, True
        # Lightning wraps this handler while it trains or tests: its loops stop at the next batch.
        if first and signal.getsignal(signal.SIGTERM) == self._handler:
            raise SIGTERMException

    def check(self) -> None:
        """Stop now if SIGTERM came while Lightning ran but after its loops last looked."""
        if self.received:
            raise SIGTERMException

    # -- the phases -------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._folder = checkpoint_folder(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.training:
            self.phase = "training"
            # A run resumed mid-epoch goes on without on_train_epoch_start.
            self._epoch, self._in_epoch = trainer.current_epoch, trainer.fit_loop.restarted_mid_epoch

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.training:
            self.phase = "trained"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch, self._in_epoch = trainer.current_epoch, True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._in_epoch = False

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase != "setup":
            self.phase = "test"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "test" and self.phase == "test":
            self.phase = "report"

    # -- stopping during training -----------------------------------------------------------

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self.phase != "training" or trainer.sanity_checking or not trainer.received_sigterm:
            return
        # Lightning's loop would stop after this batch; a validation is short (no backward pass).
        set_received_sigterm(trainer, False)
        if not self._finishing_validation:
            log.info("SIGTERM during validation: finishing it, then saving the epoch's checkpoint")
        self._finishing_validation = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "training" and not trainer.sanity_checking:
            self._validated = True
        if self._finishing_validation:  # training stops at its next check
            self._finishing_validation = False
            set_received_sigterm(trainer, True)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._validated = False

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self._saving_after_validation:
            return
        # Stopped right after a validation in the middle of an epoch (val_check_interval < 1).
        # Resuming there, Lightning skips that validation and counts the logging step of the
        # batch before it once more, as for a checkpoint saved during the validation (by
        # ModelCheckpoint), before that count went up: saved as such a checkpoint would be.
        uncount_logging_step(checkpoint)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.phase != "training":
            return
        path = checkpoint_folder(trainer) / "last.ckpt"
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        self._saving_after_validation = (
            self._validated and self._in_epoch and done < trainer.num_training_batches
        )
        try:
            trainer.save_checkpoint(path)
            self.saved = str(path)
        except Exception as exc:  # the reason for stopping matters more than this failure
            log.error("SIGTERM: could not save %s: %s", path, exc)
        finally:
            self._saving_after_validation = False
        self._logged = True
        if self._in_epoch:
            where = f"epoch {self._epoch}, after batch {done} of {trainer.num_training_batches}"
        else:
            where = f"epoch {self._epoch}'s end"
        signal_name = "Ctrl-C" if self.interrupted else "SIGTERM"
        log.warning(
            "Received %s at %s (step %d): %s", signal_name, where, trainer.global_step,
            f"saved {self.saved}" if self.saved else "no checkpoint saved",
        )  # fmt: skip

    # -- the message ------------------------------------------------------------------------

    def preempted(self, cause: BaseException | None = None) -> Preempted:
        """The error that ends a run stopped by SIGTERM: the phase, what was saved, how to go on.
        ``cause``: the error the signal brought about instead of a clean stop (SIGTERM sent to
        the whole process group, as SLURM does, ends the data loader's worker processes too)."""
        last = self._folder / "last.ckpt" if self._folder is not None else None
        last_path = str(last) if last is not None and last.is_file() else None
        if self.phase == "setup":
            when = "before training started"
            if self.resumed_from:
                unchanged = f"the checkpoint it resumes from is unchanged: {self.resumed_from}"
                error = Preempted(
                    self.resumed_from, when, f"nothing was trained; {unchanged}", interrupted=self.interrupted
                )
            else:
                nothing = "nothing was trained, so there is nothing to save: run the same command again"
                error = Preempted(None, when, nothing, interrupted=self.interrupted)
        elif self.phase == "training":
            when = "during training"
            if self.saved or last_path is None:
                error = Preempted(self.saved, when, interrupted=self.interrupted)
            else:
                why = f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})" if cause else ""
                older = f"could not save the interrupted step{why}; the last saved checkpoint is {last_path}"
                error = Preempted(last_path, when, older, interrupted=self.interrupted)
        else:
            when = {"trained": "after training", "test": "during the test"}.get(self.phase, "while reporting")
            done = "training and the test had finished" if self.phase == "report" else "training had finished"
            where = f"; its checkpoints are in {self._folder}" if self._folder is not None else ""
            then = " (trains nothing more: tests the best checkpoint, writes the report)"
            error = Preempted(last_path, when, f"{done}{where}", then, interrupted=self.interrupted)
        if not self._logged:
            self._logged = True
            log.warning(
                "Received %s %s: %s",
                "Ctrl-C" if self.interrupted else "SIGTERM",
                when,
                str(error).split("; ", 1)[-1].splitlines()[0],
            )
        return error
