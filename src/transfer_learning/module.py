"""The LightningModule: forward, losses, metrics, and the optimizer built from the strategy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from transfer_learning.backbones import Backbone, Preprocessing
from transfer_learning.strategies import Strategy

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 1e-4}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1
) -> LambdaLR:
    """Linear warm-up, then cosine decay to zero. One multiplier for every group, so the
    ratio between the backbone's and the head's learning rate holds throughout."""
    warmup = max(1, int(total_steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


class TransferLearningModule(L.LightningModule):
    """A pretrained backbone adapted to ``class_names`` by a transfer-learning strategy.

    It is built from plain config values only (saved as hyperparameters), so a checkpoint
    alone rebuilds it: :meth:`load_for_inference` restores the trained network, its class
    names and its preprocessing without the pretrained weights files.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        strategy: Mapping[str, Any],
        class_names: Sequence[str],
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        image_size: int | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "model": _plain(model),
                "strategy": _plain(strategy),
                "class_names": list(class_names),
                "optimizer": _plain(optimizer) or DEFAULT_OPTIMIZER,
                "scheduler": _plain(scheduler),
                "image_size": image_size,
                "label_smoothing": label_smoothing,
            }
        )
        self.class_names = list(class_names)
        self.backbone: Backbone = instantiate(self.hparams["model"], num_classes=len(class_names))
        self.strategy: Strategy = instantiate(self.hparams["strategy"])
        self.strategy.prepare(self.backbone)
        self.preprocessing: Preprocessing = self.backbone.preprocessing.at_size(image_size)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        n = len(class_names)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_metrics = classification_metrics(n, "val/")
        self.test_metrics = classification_metrics(n, "test/")
        self.val_acc_best = MaxMetric()
        self.test_confusion = MulticlassConfusionMatrix(n)
        self.test_confusion_matrix: torch.Tensor | None = None

    # -- forward and steps -----------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits, aux = self.backbone.forward_with_aux(x)
        loss = self.criterion(logits, y)
        for aux_logits in aux:
            loss = loss + self.backbone.aux_loss_weight * self.criterion(aux_logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=len(y))
        return logits

    def on_validation_model_train(self) -> None:
        # Lightning would restore each submodule's flag as it found it; train() re-applies
        # the backbone's policy (frozen body and BatchNorm layers stay in eval mode).
        self.trainer.model.train()  # type: ignore[union-attr]

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # drop values from the sanity-check run

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits = self._evaluate(batch, "val")
        self.val_metrics.update(logits, batch[1])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        acc = values.pop("val/acc")  # computed values are already reduced over processes
        self.val_acc_best(acc)
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits = self._evaluate(batch, "test")
        self.test_metrics.update(logits, batch[1])
        self.test_confusion.update(logits, batch[1])

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()
        # Every process takes part in the reduction; only rank zero draws the picture later.
        self.test_confusion_matrix = self.test_confusion.compute().cpu()
        self.test_confusion.reset()

    # -- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        groups = self.strategy.param_groups(self.backbone)
        optimizer = instantiate(self.hparams["optimizer"])(groups)
        if self.hparams["scheduler"] is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = instantiate(self.hparams["scheduler"])(optimizer, total_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # -- checkpoints -----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["preprocessing"] = self.preprocessing.to_dict()
        checkpoint["arch_kwargs"] = self.backbone.arch_kwargs

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "preprocessing" in checkpoint:
            self.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])

    @classmethod
    def load_for_inference(cls, path: str | Path, map_location: str = "cpu") -> TransferLearningModule:
        """Rebuild from a checkpoint alone: no pretrained weights file or network needed."""
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        hparams = dict(checkpoint["hyper_parameters"])
        model_cfg = dict(hparams["model"], weights=None)
        if checkpoint.get("arch_kwargs"):
            model_cfg["arch_kwargs"] = checkpoint["arch_kwargs"]
        hparams["model"] = model_cfg
        module = cls(**hparams)
        module.load_state_dict(checkpoint["state_dict"])
        module.on_load_checkpoint(checkpoint)
        return module.eval()
