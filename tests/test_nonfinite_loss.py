"""A NaN or infinite training loss stops the run with the likely cause, keeping the checkpoints
of the last finished epoch; the learning-rate finder, which drives the loss to diverge on
purpose, is not stopped by it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from helpers import build, run_cli, trainer
from transfer_learning.model.module import NonFiniteLossError
from transfer_learning.run.checkpoints import SafeCheckpointIO, safe_load


class ExplodeAtEpoch(Callback):
    """Sets every param group's learning rate to 1e30 when epoch ``epoch`` starts."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 1e30


def test_a_non_finite_loss_stops_training_and_keeps_the_last_finite_checkpoint(shapes_dir, tmp_path):
    module, datamodule = build(shapes_dir, "strategy=finetune", "scheduler=constant")
    last = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    run = trainer([last, ExplodeAtEpoch(1)], max_epochs=5, enable_checkpointing=True,
                  plugins=[SafeCheckpointIO()])  # fmt: skip
    with pytest.raises(NonFiniteLossError) as raised:
        run.fit(module, datamodule)
    message = str(raised.value)
    assert "the training loss became" in message and "at epoch 1, batch" in message
    assert "backbone 1e+30" in message and "head 1e+30" in message  # each group's rate, named
    assert "lower strategy.head_lr" in message
    assert run.current_epoch == 1  # stopped in the epoch it happened, not trained to the end
    saved = safe_load(tmp_path / "last.ckpt")
    assert saved["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_the_command_says_why_and_exits_non_zero(tmp_path: Path, shapes_dir: Path) -> None:
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "input.image_size=48", "strategy.head_lr=1e30",
                     "trainer.max_epochs=3", "logger=csv")  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "the training loss became" in output and "Traceback" not in output
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_lr_finder_sweep_may_diverge(shapes_dir, tmp_path, monkeypatch):
    from transfer_learning.run import lr_finder

    monkeypatch.setattr(lr_finder, "MIN_LR", 1e20)  # every step of the sweep diverges
    monkeypatch.setattr(lr_finder, "MAX_LR", 1e30)
    module, datamodule = build(shapes_dir, "strategy=finetune")
    seen: list[bool] = []
    check = module._check_finite

    def spy(loss, batch_idx):
        seen.append(bool(torch.isfinite(loss)))
        check(loss, batch_idx)

    monkeypatch.setattr(module, "_check_finite", spy)
    run = trainer(max_epochs=1, default_root_dir=str(tmp_path))
    tuned = lr_finder.tune_learning_rate(run, module, datamodule, tmp_path, [], steps=6)
    assert seen and not all(seen)  # the sweep met a non-finite loss and went on
    assert "lr finder" in tuned
    assert module.stop_on_nonfinite_loss  # back on for the real fit
    assert math.isfinite(module.strategy.head_lr)
