"""A pickle-free checkpoint (or a run folder's run_config.yaml) that names code to run: every entry
point that reads one refuses it and runs nothing (the settings in a file are data)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from forkrun import run_python

from helpers import REPO, best_checkpoint, run_cli
from transfer_learning.errors import TransferLearningError
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.results.predict import Classifier
from transfer_learning.run.checkpoints import safe_load


class Trap:
    """Unpickling this creates a file: the proof that something ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def run_folder(trained_run: Path) -> Path:
    """A real one-epoch run (48 px): its folder holds checkpoints/ and run_config.yaml."""
    return trained_run


def payloads(marker: Path, pickled: Path) -> dict[str, Any]:
    """Edits of a real checkpoint, each of which would create ``marker`` if it were obeyed."""
    touch_open = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    return {
        "strategy torch.load": {
            "strategy": {"_target_": "torch.load", "f": str(pickled), "weights_only": False}
        },
        "strategy builtins.open": {"strategy": touch_open},
        "model Path.write_text": {
            "model": {"_target_": "pathlib.Path.write_text", "self": str(marker), "data": "x"}
        },
        "optimizer shutil.copyfile": {
            "optimizer": {"_target_": "shutil.copyfile", "src": str(pickled), "dst": str(marker)}
        },
        "scheduler builtins.open": {"scheduler": {**touch_open, "interval": "epoch"}},
        "nested in strategy": {
            "strategy": {
                "_target_": "transfer_learning.model.strategies.FeatureExtraction",
                "head_lr": touch_open,
            }
        },
        "hydra args": {
            "strategy": {
                "_target_": "transfer_learning.model.strategies.FeatureExtraction",
                "_args_": [touch_open],
            }
        },
        "class names": {"class_names": [touch_open, "b"]},
        "extra hyperparameter": {"callback": touch_open},
    }


def craft(run: Path, dest: Path, marker: Path, edit: dict[str, Any]) -> Path:
    """A copy of the run's folder whose best checkpoint carries ``edit`` in its hyper_parameters."""
    if not dest.exists():
        shutil.copytree(run, dest)
    real = best_checkpoint(dest)
    checkpoint = safe_load(real)
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], **edit}
    path = dest / "checkpoints" / "crafted.ckpt"
    torch.save(checkpoint, path)
    safe_load(path)  # loads without pickle: only its contents are hostile
    return path


def test_every_payload_is_refused_by_the_python_api(run_folder: Path, tmp_path: Path) -> None:
    marker, pickled = tmp_path / "pwned", tmp_path / "second.pt"
    torch.save(Trap(marker), pickled)
    for name, edit in payloads(marker, pickled).items():
        path = craft(run_folder, tmp_path / "run", marker, edit)
        for load in (Classifier.from_checkpoint, TransferLearningModule.load_for_inference):
            with pytest.raises(TransferLearningError, match=r"refusing checkpoint .*crafted\.ckpt") as info:
                load(path)
            assert not marker.exists(), f"{name}: {load.__qualname__} ran the payload"
        if "_target_" in json.dumps(edit) and name not in ("class names", "extra hyperparameter"):
            assert "template's own" in str(info.value) or "plain values" in str(info.value), name
    arch = safe_load(path)
    arch["hyper_parameters"] = safe_load(best_checkpoint(tmp_path / "run"))["hyper_parameters"]
    arch["arch_kwargs"] = {"norm_layer": {"_target_": "builtins.open", "file": str(marker), "mode": "w"}}
    torch.save(arch, path)
    with pytest.raises(TransferLearningError, match=r"arch_kwargs\.norm_layer holds the key '_target_'"):
        Classifier.from_checkpoint(path)
    assert not marker.exists()


def test_the_templates_own_checkpoint_still_loads_and_predicts(run_folder: Path) -> None:
    best = best_checkpoint(run_folder)
    classifier = Classifier.from_checkpoint(best)
    assert classifier.class_names == ["circle", "cross", "square", "star", "triangle"]
    assert type(classifier.module.strategy).__name__ == "FeatureExtraction"
    assert classifier.module.net.backbone_frozen


def _cli(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return run_python(command[1:], cwd=cwd, env=env)


@pytest.mark.slow
def test_eval_predict_and_export_refuse_the_payload_and_train_resume_ignores_it(
    run_folder: Path, tmp_path: Path, shapes_dir: Path
) -> None:
    marker, pickled = tmp_path / "pwned", tmp_path / "second.pt"
    torch.save(Trap(marker), pickled)
    edit = {"strategy": {"_target_": "torch.load", "f": str(pickled), "weights_only": False}}
    path = craft(run_folder, tmp_path / "run", marker, edit)
    image = next(shapes_dir.glob("circle/*.jpg"))
    commands = {
        "predict": [
            sys.executable,
            "-m",
            "transfer_learning.results.predict",
            f"ckpt_path={path}",
            f"images={image}",
        ],
        "eval": [
            sys.executable,
            str(REPO / "eval.py"),
            f"ckpt_path={path}",
            f"hydra.run.dir={tmp_path}/eval",
        ],
        "export": [sys.executable, str(REPO / "scripts" / "export.py"), f"ckpt_path={path}"],
    }
    for name, command in commands.items():
        result = _cli(command, tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 2, f"{name}: {output[-2000:]}"
        assert f"refusing checkpoint {path}" in output and "Traceback" not in output, name
        assert not marker.exists(), f"{name} ran the payload"
    # Resuming builds everything from the config typed now; the strategy the checkpoint names is only
    # compared by name, and a name that is not this run's strategy is refused before anything trains.
    before = json.loads((tmp_path / "run" / "summary.json").read_text())
    resumed = run_cli(tmp_path, f"data.root={shapes_dir}", "input.image_size=48", "trainer.max_epochs=2",
                      "logger=csv", "worst_samples=0", f"ckpt_path={path}")  # fmt: skip
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 2, output[-2000:]
    assert f"cannot resume from {path}: it was trained with the load strategy" in output, output[-2000:]
    assert "Traceback" not in output
    assert not marker.exists(), "resume ran the payload"
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == before


@pytest.mark.slow
def test_eval_builds_no_data_module_a_run_config_names(run_folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    best = best_checkpoint(run)
    (run / "run_config.yaml").write_text(
        f"data:\n  _target_: builtins.open\n  file: {marker}\n  mode: w\n  root: /nowhere\n"
    )
    result = _cli([sys.executable, str(REPO / "eval.py"), f"ckpt_path={best}",
                   f"hydra.run.dir={tmp_path}/eval"], tmp_path)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert f"refusing {run / 'run_config.yaml'} (data)" in output and "Traceback" not in output
    assert not marker.exists()
