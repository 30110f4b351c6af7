"""Checkpoints that survive full disks, preemption and hostile files.

* :class:`SafeCheckpointIO` writes each checkpoint to a temporary file in the same folder,
  fsyncs it and renames it over the old one: a failed write (a full disk, a killed process)
  leaves the previous checkpoint whole. It reads every checkpoint with ``weights_only=True``,
  whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, so a crafted file cannot run code; the
  checkpoints this template writes hold only tensors and plain values.
* :class:`SaveOnPreemption` turns SIGTERM (how SLURM and spot instances preempt) into a fresh
  resumable ``last.ckpt`` and a :class:`Preempted` error, so the run exits non-zero instead of
  passing for a success.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
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
    """The run was stopped by SIGTERM after saving a resumable checkpoint."""

    def __init__(self, checkpoint: str | None) -> None:
        self.checkpoint = checkpoint
        where = (
            f"saved a resumable checkpoint: {checkpoint}" if checkpoint else "no checkpoint could be saved"
        )
        resume = (
            f"\nResume with: python train.py <same overrides> ckpt_path={checkpoint}" if checkpoint else ""
        )
        super().__init__(f"stopped by SIGTERM (preemption or a scheduler's time limit); {where}{resume}")


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
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)


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
    """On SIGTERM, save ``last.ckpt`` (the state at the interrupted step, resumable) and let the
    run end with :class:`Preempted` instead of Lightning's silent exit code 0."""

    def __init__(self) -> None:
        self.saved: str | None = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        path = checkpoint_folder(trainer) / "last.ckpt"
        try:
            trainer.save_checkpoint(path)
            self.saved = str(path)
        except Exception as exc:  # the reason for stopping matters more than this failure
            log.error("SIGTERM: could not save %s: %s", path, exc)
        log.warning(
            "Received SIGTERM at epoch %d, step %d: %s", trainer.current_epoch, trainer.global_step,
            f"saved {self.saved}" if self.saved else "no checkpoint saved",
        )  # fmt: skip


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


class RandomState(Callback):
    """Random number generator states (torch, CUDA, NumPy, Python) in every checkpoint, put back
    when a run resumes, at the point where the uninterrupted run stood: the resumed run draws
    the same shuffles and augmentations, so it ends with the same weights. Stored as tensors and
    numbers only (the checkpoint stays loadable with ``weights_only=True``)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np

        kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
        keys = np.asarray(keys)
        version, python_state, python_gauss = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "position": position,
                "has_gauss": has_gauss,
                "gauss": gauss,
            },
            "python": {"version": version, "state": list(python_state), "gauss": python_gauss},
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored now, and again after a sanity check if one runs: the first training batch
        # is drawn (and prefetched) before any epoch hook, right after these points.
        self._pending = state_dict
        self._restore()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = None

    def _restore(self) -> None:
        if self._pending is None:
            return
        import random

        import numpy as np

        state = self._pending
        torch.set_rng_state(state["torch"])
        numpy = state["numpy"]
        np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                             numpy["has_gauss"], numpy["gauss"]))  # fmt: skip
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
