"""Weight averaging (callbacks=ema / callbacks=swa): the average is the one computed by hand
from the weights after each step (or epoch), it is what the checkpoint's state_dict holds and
what the test runs on, and the real command line trains, resumes and exports with it."""

from __future__ import annotations

import json

import pytest
import torch
from forkrun import run_python
from lightning.pytorch.callbacks import Callback

from helpers import REPO, best_checkpoint, build, run_cli, trainer
from transfer_learning.errors import ConfigError
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.run.averaging import EMA, SWA
from transfer_learning.run.checkpoints import safe_load


class HeadWeights(Callback):
    """The head's weights (as they train, not the average) after every optimizer step and at
    the end of every epoch."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self.epochs: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(pl_module.net.head.weight.detach().clone())

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(pl_module.net.head.weight.detach().clone())


def fit_with(root, tmp_path, averaging, epochs):
    module, datamodule = build(root, "strategy=finetune", batch_size=16)
    recorder = HeadWeights()
    run = trainer([recorder, averaging], max_epochs=epochs, limit_train_batches=3)
    run.fit(module, datamodule=datamodule)
    path = tmp_path / "averaged.ckpt"
    run.save_checkpoint(path)
    return run, module, datamodule, recorder, path


def test_ema_is_the_hand_computed_average_and_the_test_runs_on_it(shapes_dir, tmp_path):
    decay = 0.6
    run, module, datamodule, recorder, path = fit_with(shapes_dir, tmp_path, EMA(decay=decay), epochs=2)
    average = recorder.steps[0]  # torch's AveragedModel starts from the weights after step 1
    for weights in recorder.steps[1:]:
        average = decay * average + (1 - decay) * weights
    assert len(recorder.steps) == 6
    saved = safe_load(path)
    assert torch.allclose(saved["state_dict"]["net.head.weight"], average, atol=1e-6)
    assert not torch.allclose(average, recorder.steps[-1], atol=1e-4)  # the average is not the last step
    assert torch.allclose(module.net.head.weight, average, atol=1e-6)  # copied in when training ends
    # Testing from the checkpoint runs on the average, not on current_model_state.
    module.net.head.weight.data.zero_()
    run.test(module, datamodule=datamodule, ckpt_path=str(path), verbose=False)
    assert torch.allclose(module.net.head.weight, average, atol=1e-6)


def test_swa_averages_the_epochs_from_its_start(shapes_dir, tmp_path):
    _, module, _, recorder, path = fit_with(shapes_dir, tmp_path, SWA(swa_epoch_start=1), epochs=3)
    expected = torch.stack(recorder.epochs[1:]).mean(0)
    assert torch.allclose(safe_load(path)["state_dict"]["net.head.weight"], expected, atol=1e-6)
    assert torch.allclose(module.net.head.weight, expected, atol=1e-6)


def test_a_fraction_of_the_epochs_sets_the_swa_start(shapes_dir, tmp_path):
    averaging = SWA(swa_epoch_start=0.5)
    _, _, _, recorder, path = fit_with(shapes_dir, tmp_path, averaging, epochs=4)
    assert averaging.start_epoch == 2
    expected = torch.stack(recorder.epochs[2:]).mean(0)
    assert torch.allclose(safe_load(path)["state_dict"]["net.head.weight"], expected, atol=1e-6)


def test_the_ema_half_life_sets_the_decay_from_the_steps_per_epoch(shapes_dir, tmp_path):
    averaging = EMA(half_life_epochs=2.0)
    fit_with(shapes_dir, tmp_path, averaging, epochs=1)
    assert averaging.decay == pytest.approx(0.5 ** (1 / (2.0 * 3)))  # 3 steps per epoch


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: EMA(decay=1.5), "decay=1.5"),
        (lambda: EMA(half_life_epochs=0), "half_life_epochs=0"),
        (lambda: SWA(swa_epoch_start=1.5), "swa_epoch_start=1.5"),
        (lambda: SWA(swa_epoch_start=-1), "swa_epoch_start=-1"),
    ],
)
def test_bad_averaging_settings_name_the_setting(make, says):
    with pytest.raises(ConfigError, match=says):
        make()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("averaging", "setting"),
    [
        ("ema", "callbacks.weight_averaging.half_life_epochs=1"),
        ("swa", "callbacks.weight_averaging.swa_epoch_start=0"),
    ],
)
def test_the_command_line_run_tests_the_averaged_checkpoint(shapes_dir, tmp_path, averaging, setting):
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "input.image_size=32", "strategy=finetune",
                     "trainer.max_epochs=2", "logger=csv", "worst_samples=0", f"callbacks={averaging}",
                     setting)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["weight averaging"].startswith(averaging.upper())
    assert "the checkpoints hold the averaged weights" in result.stdout
    # Written during fit: the average in state_dict, the weights being trained beside it.
    saved = safe_load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    averaged, current = saved["state_dict"], saved["current_model_state"]
    assert not torch.allclose(averaged["net.head.weight"], current["net.head.weight"])
    # The test ran on the best checkpoint's state_dict: eval (the same weights) gives its numbers.
    best = best_checkpoint(tmp_path / "run")
    evaluated = run_python([REPO / "eval.py", f"ckpt_path={best}", f"hydra.run.dir={tmp_path}/eval",
                            "data.num_workers=0"], cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    numbers = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert numbers["accuracy"] == pytest.approx(summary["test/acc"], abs=1e-6)
    if averaging == "ema":  # the exported file is the averaged network: the parity check passes
        command = [REPO / "scripts" / "export.py", f"ckpt_path={best}", f"images={shapes_dir}",
                   f"output={tmp_path / 'model.onnx'}", "max_images=4"]  # fmt: skip
        exported = run_python(command, cwd=tmp_path)
        assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]
        assert "ok: the onnx model matches" in exported.stdout
        module = TransferLearningModule.load_for_inference(best)
        assert torch.equal(module.net.head.weight, safe_load(best)["state_dict"]["net.head.weight"])


@pytest.mark.slow
def test_ema_under_ddp_keeps_one_average_for_both_processes(shapes_dir, tmp_path):
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "input.image_size=32", "strategy=finetune",
                     "trainer=ddp_cpu", "trainer.max_epochs=2", "logger=csv", "worst_samples=0",
                     "callbacks=ema")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["weight averaging"].startswith("EMA") and "x 2 devices" in summary["batch size"]
    saved = safe_load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert not torch.allclose(
        saved["state_dict"]["net.head.weight"], saved["current_model_state"]["net.head.weight"]
    )
