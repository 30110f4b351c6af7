"""Checkpoints that survive full disks, preemption and hostile files.

* :class:`SafeCheckpointIO` writes each checkpoint to a temporary file in the same folder,
  fsyncs it and renames it over the old one: a failed write (a full disk, a killed process)
  leaves the previous checkpoint whole, and says which file, how much room is left and what to
  do (:class:`CheckpointError`). It reads every checkpoint with ``weights_only=True``,
  whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, so a crafted file cannot run code; the
  checkpoints this template writes hold only tensors and plain values.
* :class:`SaveOnPreemption` makes SIGTERM (how SLURM and spot instances preempt) stop a run in
  any phase with :class:`Preempted` (exit code 143) instead of Lightning's silent exit code 0:
  during training after saving a resumable ``last.ckpt`` (a validation under way is finished
  first), before or after training saying which checkpoint to go on from.
* :class:`RandomState` puts every random number generator back where the uninterrupted run had
  it, and replays the data order of an epoch a run was stopped in: a resumed run ends with the
  weights of a run that was never stopped.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import signal
import tempfile
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transfer_learning.errors import TransferLearningError

log = logging.getLogger(__name__)


class CheckpointError(TransferLearningError, RuntimeError):
    """A checkpoint file that is missing, damaged, unsafe or made for another model."""


class Preempted(Exception):
    """The run was stopped by SIGTERM; the message says in which phase, what was saved and how
    to go on (``train.py`` exits with code 143)."""

    def __init__(self, checkpoint: str | None, when: str = "", what: str = "", then: str = "") -> None:
        self.checkpoint = checkpoint
        what = what or (
            f"saved a resumable checkpoint: {checkpoint}" if checkpoint else "no checkpoint could be saved"
        )
        resume = (
            f"\nResume with: python train.py <same overrides> ckpt_path={checkpoint}{then}"
            if checkpoint
            else ""
        )
        when = f" {when}" if when else ""
        super().__init__(f"stopped by SIGTERM (preemption or a scheduler's time limit){when}; {what}{resume}")


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening folders)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``. A
    write that fails (a full disk, a quota) leaves ``path`` as it was and raises a
    :class:`CheckpointError` that names the file, the free space and the fix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc, written) from exc
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            written = os.path.getsize(tmp)
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError)):  # torch reports a full disk as a RuntimeError
            raise _write_error(path, exc, written) from exc
        raise
    fsync_folder(path.parent)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _write_error(path: Path, exc: BaseException, written: int) -> CheckpointError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    try:
        free = f"{_size(shutil.disk_usage(path.parent).free)} free on the disk of {path.parent}"
    except OSError:
        free = f"free space on the disk of {path.parent} unknown"
    after = f" after {_size(written)}" if written else ""
    kept = f"{path} is untouched" if path.exists() else f"nothing was written to {path}"
    return CheckpointError(
        f"could not write checkpoint {path}{after} ({reason}); {free}. {kept}. Fix: free some space "
        "there (or give the checkpoints a disk with room: hydra.run.dir, or "
        "callbacks.model_checkpoint.dirpath and callbacks.last_checkpoint.dirpath), then resume "
        "with ckpt_path=<the run's checkpoints/last.ckpt>."
    )


def safe_load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint read without pickle (``weights_only=True``), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Check ckpt_path (runs keep theirs in "
            "logs/<task>/runs/<date>/checkpoints/)."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects that only pickle can rebuild, and "
            f"unpickling a file can run arbitrary code ({str(exc).splitlines()[0]}). This template's "
            "checkpoints never need that; use a checkpoint it wrote, or one you trust after converting "
            "it to a plain state_dict."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        size = path.stat().st_size
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes): it is truncated or corrupt ({exc}). "
            "Use another checkpoint of the run (last.ckpt or best-*.ckpt)."
        ) from exc


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with atomic writes and pickle-free reads (see the module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO.save_checkpoint takes no storage_options")
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Callable | Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")


def checkpoint_folder(trainer: L.Trainer) -> Path:
    callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)  # type: ignore[attr-defined]
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


class SaveOnPreemption(Callback):
    """SIGTERM anywhere in a run: save what can be saved, say so, and end the run with
    :class:`Preempted` (exit code 143) instead of Lightning's silent exit code 0.

    :meth:`handling_sigterm` holds a SIGTERM handler for the whole run. Outside Lightning's own
    handling (building the data and the model, the report) it stops the run at once (the loader
    workers leave the stopping to the main process: :func:`loader_worker_init`). Inside
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
        self._pid = os.getpid()
        self._logged = False
        self._epoch, self._in_epoch = 0, False
        self._validated = False  # a validation ran after the last training batch
        self._saving_after_validation = False

    # -- the signal -------------------------------------------------------------------------

    @contextmanager
    def handling_sigterm(self) -> Iterator[None]:
        """SIGTERM handled as this class says while the block runs (in the main thread; other
        threads cannot set signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._pid = os.getpid()
        self._handler = self._on_sigterm
        previous = signal.signal(signal.SIGTERM, self._handler)
        try:
            yield
        finally:  # None: a handler set outside Python, which cannot be put back; the default then
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

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
        trainer._signal_connector.received_sigterm = False
        if not self._finishing_validation:
            log.info("SIGTERM during validation: finishing it, then saving the epoch's checkpoint")
        self._finishing_validation = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.phase == "training" and not trainer.sanity_checking:
            self._validated = True
        if self._finishing_validation:  # training stops at its next check
            self._finishing_validation = False
            trainer._signal_connector.received_sigterm = True

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
        state = checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]
        state["_batches_that_stepped"] -= 1

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
        log.warning(
            "Received SIGTERM at %s (step %d): %s", where, trainer.global_step,
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
                error = Preempted(self.resumed_from, when, f"nothing was trained; {unchanged}")
            else:
                nothing = "nothing was trained, so there is nothing to save: run the same command again"
                error = Preempted(None, when, nothing)
        elif self.phase == "training":
            when = "during training"
            if self.saved or last_path is None:
                error = Preempted(self.saved, when)
            else:
                why = f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})" if cause else ""
                older = f"could not save the interrupted step{why}; the last saved checkpoint is {last_path}"
                error = Preempted(last_path, when, older)
        else:
            when = {"trained": "after training", "test": "during the test"}.get(self.phase, "while reporting")
            done = "training and the test had finished" if self.phase == "report" else "training had finished"
            where = f"; its checkpoints are in {self._folder}" if self._folder is not None else ""
            then = " (trains nothing more: tests the best checkpoint, writes the report)"
            error = Preempted(last_path, when, f"{done}{where}", then)
        if not self._logged:
            self._logged = True
            log.warning("Received SIGTERM %s: %s", when, str(error).split("; ", 1)[-1].splitlines()[0])
        return error


def loader_worker_init(worker_id: int, rank: int = 0, main: int | None = None) -> None:
    """``worker_init_fn`` of the data module's loaders, run in each worker process: Lightning's
    seeding of the worker (as ``seed_everything(workers=True)`` asks for), and SIGTERM from
    anyone but the main process ignored. SLURM signals every process of a job: a worker ended by
    it would end the run with a DataLoader error before the main process, told by the same
    signal, saves its checkpoint and stops the workers itself (its SIGTERM still ends them)."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank)
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: workers keep torch's handling
        return
    main = main or os.getppid()  # the process that made the loader (a forkserver is not it)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # from here on, only this waits for it

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main:
            pass
        os._exit(0)  # what torch's own handler does when the main process sends it

    threading.Thread(target=wait, name="sigterm-from-main-only", daemon=True).start()


def _model_name(hparams: dict[str, Any]) -> str:
    spec = hparams.get("model") or {}
    return str(spec.get("name") or str(spec.get("_target_", "?")).rsplit(".", 1)[-1])


def _few(names: list[str]) -> str:
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: str = "the checkpoint") -> None:
    """Refuse to resume a run from a checkpoint of another model or other classes, saying what
    each one is, instead of a dump of mismatched state_dict keys."""
    problems = []
    if _model_name(saved) != _model_name(current):
        problems.append(f"it holds a {_model_name(saved)}, this run builds a {_model_name(current)}")
    old, new = list(saved.get("class_names") or []), list(current.get("class_names") or [])
    if old and old != new:
        problems.append(
            f"it was trained on {len(old)} classes ({_few(old)}), this data has {len(new)} ({_few(new)})"
        )
    if problems:
        raise CheckpointError(
            f"cannot resume from {path}: {'; '.join(problems)}. Resume with the model and data it was "
            "trained with (its run folder's .hydra/config.yaml has them), or drop ckpt_path to start a "
            "new run."
        )


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
        if "now" not in state_dict:  # a checkpoint from before the replay: saved at an epoch's end
            state_dict = {"now": state_dict, "epoch_start": state_dict, "replay": 0}
        self._resume = state_dict
        self._epoch_start = state_dict["epoch_start"]
        _set_rng_state(state_dict["epoch_start"])

    # The first epoch of a fit draws its batches from a loader iterator made while the fit is
    # set up (for the optimizer's step count) or, at the latest, right after the sanity check:
    # until it is made, the state it will draw from is put back (resuming) or noted (not).

    def _before_first_iterator(self, trainer: L.Trainer) -> None:
        if getattr(trainer.fit_loop, "_combined_loader", None) is not None:
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
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        iterator = getattr(fetcher, "iterator", None)
        if iterator is None or getattr(fetcher, "batches", None):
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
