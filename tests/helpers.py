"""Shared by the tests: the module and data module built from the real YAML, and a quiet Trainer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from transfer_learning.config import build as build_from_config
from transfer_learning.config import compose_config
from transfer_learning.data import ImageFolderDataModule
from transfer_learning.module import TransferLearningModule


def build(
    root: Path, *overrides: str, image_size: int = 32, batch_size: int = 8
) -> tuple[TransferLearningModule, ImageFolderDataModule]:
    """``python train.py data=imagefolder data.root=<root> <overrides>``'s two objects, composed
    from conf/ and built by the one build path; tiny images, no loader workers."""
    cfg = compose_config(
        [
            "data=imagefolder",
            f"data.root={root}",
            f"data.image_size={image_size}",
            f"data.batch_size={batch_size}",
            "data.num_workers=0",
            "data.verify_images=false",
            *overrides,
        ]
    )
    datamodule, module = build_from_config(cfg)
    return module, datamodule


def trainer(callbacks: Sequence[Callback] = (), **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 1,
        **kwargs,
    }
    return L.Trainer(callbacks=list(callbacks), **options)
