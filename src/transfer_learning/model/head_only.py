"""Checkpoints of a frozen pretrained backbone hold what trains, not megabytes that never change.

Feature extraction trains a head of a few thousand parameters on a backbone that stays exactly
the pretrained one (frozen, BatchNorm statistics in eval mode). Writing the backbone into every
epoch's checkpoint costs most of a cached run's checkpoint time and disk (13.5 MB per file for
EfficientNet-Lite0, 528 MB for VGG-16). So while such a run fits, its checkpoints leave the
backbone out and record a fingerprint of it instead (:data:`FROZEN_KEY`; a checkpoint saved by
hand once fitting is over is whole). Loading one puts the backbone back from the module being
built, which holds the same pretrained weights, and refuses a backbone whose fingerprint
differs. When fitting ends, :func:`complete_checkpoints` writes the backbone back into every
checkpoint the run kept, so the files a finished run leaves are whole classifiers that load
without any weights file; only a run stopped mid-fit (killed, preempted) leaves head-only
files, which resume exactly and load wherever the pretrained weights are.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

from transfer_learning.errors import CheckpointError
from transfer_learning.readers import read_checkpoint as safe_load
from transfer_learning.writing import atomic_save

if TYPE_CHECKING:
    import lightning as L

    from transfer_learning.model.module import TransferLearningModule

log = logging.getLogger(__name__)

FROZEN_KEY = "frozen_backbone"
PREFIX = "net.backbone."
# The model weights a checkpoint's state may sit under: Lightning's, and the training weights a
# weight-averaging callback (callbacks=ema/swa) keeps beside the averaged ones.
STATE_KEYS = ("state_dict", "current_model_state")


def leaves_out_backbone(module: TransferLearningModule) -> bool:
    """Whether the backbone is the pretrained one, untouched for the whole fit: frozen by a
    strategy that never unfreezes it, with trained weights that can be rebuilt."""
    net = module.net
    return net.backbone_frozen and net.pretrained and not module.strategy.changes_what_trains


def fitting(trainer: L.Trainer | None) -> bool:
    """Whether ``trainer`` is in the middle of a fit: checkpoints saved then (each epoch's, the
    preemption's) leave the backbone out; one saved by hand after fitting is whole."""
    if trainer is None:
        return False
    state = trainer.state
    return state.fn == TrainerFn.FITTING and state.status == TrainerStatus.RUNNING


def backbone_state(module: TransferLearningModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if k.startswith(PREFIX)}


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, shapes, dtypes and values (memory layout aside)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def backbone_fingerprint(module: TransferLearningModule) -> str:
    """:func:`fingerprint` of the module's backbone; hashed once and kept on the module while the
    backbone cannot change (:func:`leaves_out_backbone`: every save and completion reuses it)."""
    if not leaves_out_backbone(module):
        return fingerprint(backbone_state(module))
    if module._backbone_fingerprint is None:
        module._backbone_fingerprint = fingerprint(backbone_state(module))
    return module._backbone_fingerprint


def leave_out_backbone(checkpoint: dict[str, Any], module: TransferLearningModule, known: str) -> None:
    """Drop the backbone's tensors from ``checkpoint``, recording ``known`` (its fingerprint)."""
    count = 0
    for key in STATE_KEYS:
        state = checkpoint.get(key)
        if isinstance(state, dict):
            kept = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
            count = max(count, len(state) - len(kept))
            checkpoint[key] = kept
    weights = (module.hparams.get("model") or {}).get("weights")
    checkpoint[FROZEN_KEY] = {"fingerprint": known, "tensors": count, "weights": str(weights)}


def put_back_backbone(checkpoint: dict[str, Any], module: TransferLearningModule, source: str) -> None:
    """Give a head-only ``checkpoint`` its backbone back from ``module`` (built with the same
    pretrained weights); a whole checkpoint is left as it is."""
    record = checkpoint.pop(FROZEN_KEY, None)
    if record is None:
        return
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
        raise CheckpointError(f"{source}: its '{FROZEN_KEY}' entry is damaged; use another checkpoint.")
    state = backbone_state(module)
    weights = record.get("weights")
    if not module.net.pretrained or backbone_fingerprint(module) != record["fingerprint"]:
        raise CheckpointError(
            f"{source} holds only the head of a feature-extraction run (written before that run "
            f"finished); its frozen backbone is the pretrained weights '{weights}', which the "
            "network built now does not have (other weights, another version of them, or "
            "model.weights=null). Build it with the same model and model.weights, or use a "
            "checkpoint of a finished run (those hold the whole network)."
        )
    for key in STATE_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint[key] = {**checkpoint[key], **state}


def run_checkpoints(trainer: L.Trainer) -> list[Path]:
    """The checkpoint files the run's checkpoint callbacks keep (best, top k, last), resumed
    ones included; not whatever else shares their folder, and nothing outside it (a resumed
    checkpoint's callback state may name any path: it is data, not a list of files to rewrite)."""
    paths: set[Path] = set()
    for callback in trainer.checkpoint_callbacks:
        named = {str(p) for p in (getattr(callback, "best_k_models", {}) or {})}
        named |= {str(getattr(callback, name, "") or "") for name in ("best_model_path", "last_model_path")}
        folder = Path(str(getattr(callback, "dirpath", "") or trainer.default_root_dir)).absolute()
        paths |= {Path(p).absolute() for p in named if p and Path(p).absolute().parent == folder}
    return sorted(p for p in paths if p.is_file())


def complete_checkpoints(trainer: L.Trainer, module: TransferLearningModule) -> list[Path]:
    """On rank zero, after fitting: write the backbone back into every head-only checkpoint the
    run kept. Returns the files completed; a file of another backbone (a folder shared with
    another run) is left as it is, with a warning."""
    if not leaves_out_backbone(module):  # every file is whole: none to read (every process agrees)
        return []
    done: list[Path] = []
    if trainer.is_global_zero:
        for path in run_checkpoints(trainer):
            checkpoint = safe_load(path)
            if FROZEN_KEY not in checkpoint:
                continue
            try:
                put_back_backbone(checkpoint, module, f"checkpoint {path}")
            except CheckpointError as exc:
                log.warning("Left as it is: %s", exc)
                continue
            atomic_save(checkpoint, path)
            done.append(path)
    trainer.strategy.barrier("checkpoints completed")
    return done
