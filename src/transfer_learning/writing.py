"""Files written whole or not at all: a temporary file next to the target, fsynced, then
renamed over it. A write that fails (a full disk, a quota, a killed process) leaves the
previous file as it was and says which file, how much room is left and what to do."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from transfer_learning.errors import CheckpointError, byte_size


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
