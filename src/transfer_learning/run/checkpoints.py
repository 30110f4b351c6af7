"""Checkpoints that survive full disks and hostile files.

:class:`SafeCheckpointIO` writes each checkpoint to a temporary file in the same folder, fsyncs
it and renames it over the old one: a failed write (a full disk, a killed process) leaves the
previous checkpoint whole, and says which file, how much room is left and what to do
(:class:`CheckpointError`). It reads every checkpoint with ``weights_only=True``, whatever
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, so a crafted file cannot run code; the checkpoints
this template writes hold only tensors and plain values. What a checkpoint's settings may build
is :mod:`transfer_learning.run.registry`'s business; stopping and resuming are in
:mod:`transfer_learning.run.preemption` and :mod:`transfer_learning.run.random_state`.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from transfer_learning.errors import TransferLearningError, byte_size

log = logging.getLogger(__name__)


class CheckpointError(TransferLearningError, RuntimeError):
    """A checkpoint file that is missing, damaged, unsafe or made for another model."""


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


def _write_error(path: Path, exc: BaseException, written: int) -> CheckpointError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    try:
        free = f"{byte_size(shutil.disk_usage(path.parent).free)} free on the disk of {path.parent}"
    except OSError:
        free = f"free space on the disk of {path.parent} unknown"
    after = f" after {byte_size(written)}" if written else ""
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
