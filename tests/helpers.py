"""Small builders shared by the tests: a module + data module on generated images, a Trainer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from transfer_learning.data import ImageFolderDataModule
from transfer_learning.module import TransferLearningModule

LITE0 = {"_target_": "transfer_learning.backbones.efficientnet_lite0", "weights": "bundled"}
FEATURE_EXTRACT = {"_target_": "transfer_learning.strategies.FeatureExtraction", "head_lr": 1e-2}
FINETUNE = {"_target_": "transfer_learning.strategies.FineTuning", "head_lr": 1e-3, "backbone_lr": 1e-4}


def build(
    root: Path,
    strategy: Mapping[str, Any],
    model: Mapping[str, Any] = LITE0,
    image_size: int = 32,
    batch_size: int = 8,
    **module_kwargs: Any,
) -> tuple[TransferLearningModule, ImageFolderDataModule]:
    datamodule = ImageFolderDataModule(str(root), batch_size=batch_size, num_workers=0, verify_images=False)
    module = TransferLearningModule(
        model=model,
        strategy=strategy,
        class_names=datamodule.discover(),
        image_size=image_size,
        **module_kwargs,
    )
    datamodule.set_preprocessing(module.preprocessing)
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
