"""Feature extraction writes head-only checkpoints while it trains (the frozen backbone never
changes), resumes from them exactly, and leaves whole checkpoints when it finishes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from test_resume_exact import assert_same_history, pause_at, stop_at

from helpers import assert_same_weights, finished_run, run_cli
from transfer_learning.model.backbones.lite0 import efficientnet_lite0
from transfer_learning.model.head_only import FROZEN_KEY, PREFIX, complete_checkpoints
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.run.checkpoints import CheckpointError, atomic_save, safe_load

# The shared shapes (48 training images): 6 steps of 8 per epoch, on cached features.
ARGS = ["input.image_size=64", "data.batch_size=8", "strategy=feature_extract", "logger=csv",
        "worst_samples=0", "trainer.max_epochs=3", "trainer.log_every_n_steps=1",
        "calibrate=false"]  # fmt: skip


def pretrained_backbone() -> dict[str, torch.Tensor]:
    return efficientnet_lite0(num_classes=5).backbone.state_dict()


def assert_whole(path: Path, pretrained: dict[str, torch.Tensor]) -> None:
    checkpoint = safe_load(path)
    assert FROZEN_KEY not in checkpoint, path
    state = checkpoint["state_dict"]
    backbone = {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}
    assert backbone.keys() == pretrained.keys(), path
    assert all(torch.equal(backbone[k], pretrained[k]) for k in pretrained), path  # BN stats too


@pytest.fixture(scope="module")
def straight(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run(tmp_path_factory.mktemp("straight_fe"), f"data.root={shapes_dir}", *ARGS)


@pytest.mark.slow
def test_killed_feature_extraction_resumes_from_a_head_only_checkpoint_exactly(
    tmp_path, shapes_dir, straight
):
    """SIGKILL at the start of epoch 2: last.ckpt (the end of epoch 1) holds the head and its
    optimizer state, not the 3.4M frozen parameters; resumed, the run ends with the straight
    run's weights and history, and every checkpoint both runs leave is the whole network with
    the pretrained backbone, BatchNorm statistics included."""
    data = f"data.root={shapes_dir}"
    pause = pause_at("on_train_batch_start", tmp_path, batch=0, epoch=2)
    code, output = stop_at(tmp_path, signal.SIGKILL, data, *ARGS, *pause)
    assert code == -signal.SIGKILL, output[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = safe_load(last)
    assert checkpoint["global_step"] == 2 * 6 and FROZEN_KEY in checkpoint
    assert not [k for k in checkpoint["state_dict"] if k.startswith(PREFIX)]
    assert set(checkpoint["state_dict"]) == {"net.head.weight", "net.head.bias"}
    pretrained = pretrained_backbone()
    record = checkpoint[FROZEN_KEY]
    assert record["tensors"] == len(pretrained) and record["weights"] == "bundled"
    whole = straight / "checkpoints" / "last.ckpt"
    assert last.stat().st_size < 200_000 < 10_000_000 < whole.stat().st_size

    resumed = run_cli(tmp_path, data, *ARGS, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "run", straight)
    assert_same_history(tmp_path / "run", straight)
    for run in (straight, tmp_path / "run"):
        files = sorted((run / "checkpoints").glob("*.ckpt"))
        assert len(files) >= 2
        for path in files:
            assert_whole(path, pretrained)


def test_a_head_only_checkpoint_predicts_and_a_foreign_backbone_is_refused(tmp_path, shapes_dir, caplog):
    """A head-only checkpoint (a run stopped mid-fit) loads for inference with the pretrained
    backbone put back; one whose recorded backbone differs from the weights built now is
    refused with a message that says what the file holds and what to do."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from helpers import build, trainer

    module, datamodule = build(shapes_dir, "strategy=feature_extract", image_size=64)
    saving = ModelCheckpoint(dirpath=tmp_path, filename="head")  # written while fitting
    fit = trainer([saving], max_epochs=1, enable_checkpointing=True)
    fit.fit(module, datamodule)
    path = tmp_path / "head.ckpt"
    assert FROZEN_KEY in safe_load(path)
    fit.save_checkpoint(tmp_path / "after.ckpt")  # by hand after fitting: whole
    assert FROZEN_KEY not in safe_load(tmp_path / "after.ckpt")

    loaded = TransferLearningModule.load_for_inference(path)
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 64, 64)
    module.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), module(x))

    checkpoint = safe_load(path)
    checkpoint[FROZEN_KEY]["fingerprint"] = "0" * 64  # another backbone than lite0's ImageNet weights
    atomic_save(checkpoint, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="holds only the head of a feature-extraction run") as error:
        TransferLearningModule.load_for_inference(tmp_path / "foreign.ckpt")
    assert "bundled" in str(error.value) and "checkpoint of a finished run" in str(error.value)

    # Completing the run's files touches its own checkpoint, not another run's in the same folder.
    foreign = (tmp_path / "foreign.ckpt").read_bytes()
    assert complete_checkpoints(fit, module) == [path]
    assert FROZEN_KEY not in safe_load(path) and (tmp_path / "foreign.ckpt").read_bytes() == foreign
    with caplog.at_level("WARNING"):
        saving.best_k_models[str(tmp_path / "foreign.ckpt")] = torch.tensor(0.0)
        assert complete_checkpoints(fit, module) == []  # its own is whole now; the other is refused
    assert any("Left as it is" in r.getMessage() for r in caplog.records)
