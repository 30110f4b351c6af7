"""Each mistake users make gets one message that names the setting or file and the fix, before
any heavy work, and never a traceback."""

from __future__ import annotations

import pytest
import torch
from forkrun import run_python

from helpers import REPO, run_cli
from transfer_learning.data.datamodule import ImageFolderDataModule
from transfer_learning.errors import ConfigError, WeightsError
from transfer_learning.model.backbones.weights_file import read_state_dict
from transfer_learning.pipelines.train import check_trainer, check_writable
from transfer_learning.preprocessing import Preprocessing, resolve_input_size
from transfer_learning.run.config import compose_config


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"batch_size": 0}, "data.batch_size=0: the batch size (per device) must be 1 or more."),
        ({"batch_size": -3}, "data.batch_size=-3: the batch size (per device) must be 1 or more."),
        ({"num_workers": -1}, "data.num_workers=-1: use 0 (load in the main process), a positive number"),
    ],
)
def test_impossible_loader_settings(tmp_path, setting, message):
    with pytest.raises(ConfigError) as error:
        ImageFolderDataModule(str(tmp_path), **setting)
    assert str(error.value).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_trainer_without_a_gpu():
    with pytest.raises(
        ConfigError, match=r"trainer.accelerator=gpu, but torch finds no GPU .*Use trainer=cpu"
    ):
        check_trainer(compose_config(["trainer=gpu"]))


def test_zero_epochs_would_test_an_untrained_head():
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=0 trains nothing"):
        check_trainer(compose_config(["trainer.max_epochs=0"]))


def test_an_image_size_the_network_cannot_see_anything_at():
    weights = Preprocessing(resize_size=256, crop_size=224)
    with pytest.raises(ConfigError, match=r"input.image_size=8: too small to learn from.*32 px or more"):
        resolve_input_size(weights, 8)
    assert resolve_input_size(weights, 32).crop_size == 32


def test_a_text_file_as_weights(tmp_path):
    text = tmp_path / "weights.pth"
    text.write_text("<html>403 Forbidden</html>\n")
    with pytest.raises(WeightsError) as error:
        read_state_dict(text)
    message = str(error.value)
    assert message.startswith(f"cannot read weights file {text} (27 bytes): it is not a PyTorch state_dict")
    assert "Download it again, or point model.weights at the right file" in message


def test_an_output_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(
        ConfigError, match=r"cannot write to .*a_file/checkpoints \(callbacks.model_checkpoint.dirpath\)"
    ):
        check_writable(blocker / "checkpoints", "callbacks.model_checkpoint.dirpath")


@pytest.mark.slow
def test_the_command_line_reports_them_without_a_traceback(tmp_path, shapes_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = {
        f"hydra.run.dir={blocker}/run": f"cannot write to {blocker}/run (hydra.run.dir): Not a directory",
        f"ckpt_path={tmp_path}/nope.ckpt": f"ckpt_path={tmp_path}/nope.ckpt: no such file",
        "input.image_size=8": "input.image_size=8: too small to learn from",
        "trainer.max_epochs=0": "trainer.max_epochs=0 trains nothing",
    }
    for override, message in cases.items():
        args = [f"data.root={shapes_dir}", "logger=csv", override]
        if override.startswith("hydra.run.dir"):  # run_cli sets its own run folder: not this one
            result = run_python([REPO / "train.py", *args], cwd=tmp_path)
        else:
            result = run_cli(tmp_path, *args)
        output = result.stdout + result.stderr
        assert result.returncode == 2, (override, output[-2000:])
        assert message in output, (override, output[-2000:])
        assert "Traceback" not in output, override


@pytest.mark.slow
def test_predict_names_a_missing_or_non_image_file(tmp_path, shapes_dir):
    trained = run_cli(
        tmp_path, f"data.root={shapes_dir}", "input.image_size=48", "trainer.max_epochs=1", "logger=csv"
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for path, message in ((tmp_path / "missing.jpg", "No such file"), (text, "cannot identify image file")):
        result = run_python(
            ["-m", "transfer_learning.results.predict", f"ckpt_path={checkpoint}", f"images={path}"],
            cwd=tmp_path,
            timeout=300,
        )
        assert result.returncode == 1  # a bad file is skipped and reported, not a usage error
        assert f"error: cannot read image {path}" in result.stderr and message in result.stderr
        assert "Traceback" not in result.stderr


def test_an_unreadable_class_folder_is_not_called_empty(tmp_path, monkeypatch):
    """chmod 000 does not stop root (this suite may run as root): the permission error is
    raised where the folder is listed, as the OS would."""
    import os

    from transfer_learning.data.demo import generate_shapes
    from transfer_learning.data.sources.imagefolder import class_folders

    root = generate_shapes(tmp_path / "data", images_per_class=2, image_size=32, classes=("circle", "star"))
    locked = root / "star"
    real_scandir = os.scandir

    def scandir(path):  # rmtree (pytest's tmp_path clean-up) lists folders by descriptor
        if not isinstance(path, int) and os.path.abspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(Exception) as error:
        class_folders(root)
    message = str(error.value)
    assert message.startswith(f"cannot read folder(s) {locked}: permission denied")
    assert "no images" not in message and "chmod" in message
