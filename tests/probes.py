"""Callbacks the tests put into real `python train.py` runs (with tests/ on PYTHONPATH), e.g.
`+callbacks.probe._target_=probes.SaveReplicas +callbacks.probe.folder=...`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class SaveReplicas(Callback):
    """Each process writes its copy of the backbone after every training epoch, and the labels
    of its first batch: `<folder>/rank<r>-epoch<e>.pt`."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.first_labels: list[int] | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if self.first_labels is None:
            self.first_labels = batch[1].tolist()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        net = pl_module.net  # type: ignore[attr-defined]
        state = {
            "backbone": {k: v.detach().cpu().clone() for k, v in net.backbone.state_dict().items()},
            "requires_grad": [p.requires_grad for p in net.backbone.parameters()],
            "first_labels": self.first_labels,
            "world_size": trainer.world_size,
        }
        torch.save(state, self.folder / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.pt")


class KillAtEpoch(Callback):
    """SIGKILL (no chance to save anything) at the start of training epoch ``epoch``: the run
    stops right after the previous epoch's checkpoints were written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
