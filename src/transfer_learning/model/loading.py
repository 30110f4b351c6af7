"""A trained module rebuilt from its checkpoint alone, its settings treated as data."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transfer_learning.errors import CheckpointError, TransferLearningError
from transfer_learning.model import allowed
from transfer_learning.model.head_only import FROZEN_KEY, put_back_backbone
from transfer_learning.readers import read_checkpoint as safe_load
from transfer_learning.specs import UnsafeSpecError, check_plain

if TYPE_CHECKING:
    from transfer_learning.model.module import TransferLearningModule

# State-dict entries of losses, which are not part of the model: checkpoints written before the
# loss weights became a non-persistent buffer hold ``train_criterion.weight`` (weighted_loss).
LOSS_KEYS = ("criterion.", "train_criterion.")


def model_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the losses' entries."""
    return {k: v for k, v in state_dict.items() if not k.startswith(LOSS_KEYS)}


def load_for_inference(
    cls: type[TransferLearningModule], path: str | Path, map_location: str = "cpu"
) -> TransferLearningModule:
    """Rebuild from a checkpoint alone: no pretrained weights file or network needed (except for
    a head-only checkpoint, :mod:`transfer_learning.model.head_only`).

    The checkpoint's settings are data: its backbone builder, strategy, optimizer and scheduler
    must be the template's own (:mod:`transfer_learning.model.allowed`), with plain values;
    anything else is refused before anything is built. A checkpoint without ``task`` is a
    single-label one (written before multi-label existed)."""
    checkpoint = safe_load(path, map_location=map_location)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} is not a checkpoint of this template (no hyper_parameters/state_dict)."
        )
    source = f"checkpoint {path}"
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "trusted"}
    unknown = sorted(set(hparams) - known)
    if unknown or "model" not in hparams or "strategy" not in hparams:
        raise UnsafeSpecError(
            f"refusing {source}: its hyper_parameters ({sorted(hparams)}) are not this template's "
            f"({sorted(known)})."
        )
    for key, value in hparams.items():  # the four specs are checked by allowed.resolve below
        if key not in allowed.KINDS:
            check_plain(value, key, source)
    for key in ("arch_kwargs", "thresholds", "calibration"):
        if checkpoint.get(key) is not None:
            check_plain(checkpoint[key], key, source)
    # The pretrained weights are built only for a head-only checkpoint (a feature-extraction run
    # stopped mid-fit): every other checkpoint holds the whole network.
    head_only = FROZEN_KEY in checkpoint
    model_cfg = dict(hparams["model"]) if head_only else dict(hparams["model"], weights=None)
    if checkpoint.get("arch_kwargs"):
        model_cfg["arch_kwargs"] = checkpoint["arch_kwargs"]
    hparams = {**hparams, "model": model_cfg}
    for kind in ("model", "strategy", "optimizer", "scheduler"):
        spec = hparams.get(kind)
        if kind == "scheduler" and not (spec or {}).get("_target_"):
            continue  # scheduler=constant
        allowed.resolve(kind, spec, source)
    try:
        module = cls(**hparams, trusted=False)
    except TransferLearningError as exc:
        if not head_only:
            raise
        raise CheckpointError(
            f"{path} holds only the head of a feature-extraction run that did not finish; its "
            f"backbone is rebuilt from the pretrained weights '{model_cfg.get('weights')}', which "
            f"failed: {exc}"
        ) from exc
    put_back_backbone(checkpoint, module, f"checkpoint {path}")
    module.on_load_checkpoint(checkpoint)  # drops the losses' entries, restores thresholds
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


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
