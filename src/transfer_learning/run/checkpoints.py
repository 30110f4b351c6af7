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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from transfer_learning.errors import CheckpointError, RunFinished, TransferLearningError, count
from transfer_learning.model.loading import check_compatible
from transfer_learning.readers import json_field
from transfer_learning.readers import read_checkpoint as safe_load
from transfer_learning.writing import atomic_save

log = logging.getLogger(__name__)


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


def epochs_done(saved: dict[str, Any]) -> int:
    """The training epochs a checkpoint has finished (Lightning's fit-loop progress; an epoch
    stopped in the middle does not count)."""
    progress = ((saved.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}
    return int((progress.get("current") or {}).get("processed", saved.get("epoch", 0)))


def _early_stopped(saved: dict[str, Any]) -> bool:
    states = (saved.get("callbacks") or {}).items()
    return any(str(k).startswith("EarlyStopping") and (v or {}).get("stopped_epoch", 0) for k, v in states)


def _strategy_name(spec: Any) -> str:
    return str((spec or {}).get("_target_", "?")).rsplit(".", 1)[-1]


def check_resumable(
    saved: dict[str, Any], current: dict[str, Any], param_groups: int, max_epochs: int | None,
    path: str, run_folder: Path | None,
) -> int:  # fmt: skip
    """Whether training can go on from ``saved`` as this run is set up (``current``: the module's
    hyperparameters; ``param_groups``: how many its strategy makes); the epochs it has done.

    Refuses, with the command that would work, a checkpoint of another model or other classes
    (:func:`check_compatible`), of another strategy or number of param groups (its optimizer state
    cannot carry over), or one that has done more epochs than ``max_epochs``. A run whose
    training ended (all its epochs, or early stopping) and whose results were written raises
    :class:`RunFinished`."""
    hparams = saved.get("hyper_parameters") or {}
    check_compatible(hparams, current, path)
    resume = f"python train.py ckpt_path={path}"
    old, new = _strategy_name(hparams.get("strategy")), _strategy_name(current.get("strategy"))
    saved_groups = [len(s.get("param_groups", [])) for s in saved.get("optimizer_states") or []]
    if old != new or (saved_groups and saved_groups[0] != param_groups):
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with the {old} strategy "
            f"({saved_groups[0] if saved_groups else '?'} param groups), this run uses {new} "
            f"({param_groups}): the optimizer's state cannot carry over. Continue it as it was "
            f"started: `{resume}` (its own settings are restored when it is in its run folder); "
            "or drop ckpt_path to start a new run with these settings."
        )
    done = epochs_done(saved)
    if max_epochs is not None and max_epochs >= 0 and done > max_epochs:
        raise CheckpointError(
            f"cannot resume from {path}: it has trained {count(done, 'epoch')}, more than trainer.max_epochs="
            f"{max_epochs}. To train longer, give more: `{resume} trainer.max_epochs={done + 10}`."
        )
    ended = _early_stopped(saved) or (max_epochs is not None and max_epochs >= 0 and done >= max_epochs)
    summary = run_folder / "summary.json" if run_folder is not None else None
    if ended and summary is not None and summary.is_file():
        how = (
            "early stopping ended it"
            if _early_stopped(saved)
            else f"{done} of {count(max_epochs or 0, 'epoch')}"
        )
        try:
            best = json_field(summary, "best checkpoint", fix="", default=None) or path
        except TransferLearningError:
            best = path
        raise RunFinished(
            f"{run_folder} has already finished ({how}): nothing to resume, its results are left as "
            f"they are (summary.json, report.md). To train it longer: `{resume} trainer.max_epochs="
            f"{done + 10}`; to evaluate its best checkpoint: `python eval.py ckpt_path={best}`."
        )
    return done
