"""End to end through the command users type: `python train.py ...` in a subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from transfer_learning.demo import CLASSES
from transfer_learning.predict import Classifier

REPO = Path(__file__).resolve().parents[1]


def run_cli(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *(["--multirun"] if multirun else []),
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/run",
            "data.num_workers=0",
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_run(tmp_path: Path, result: subprocess.CompletedProcess[str], strategy: str) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Run summary" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == strategy
    for key in ("best val/acc", "test/acc", "test/f1"):
        assert 0.0 <= summary[key] <= 1.0, key
    checkpoint = Path(summary["best checkpoint"])
    assert checkpoint.is_file() and checkpoint.parent == tmp_path / "run" / "checkpoints"
    assert Image.open(summary["confusion matrix"]).size[0] > 100
    with open(summary["CSV metrics"]) as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("val/acc") for row in rows) and any(row.get("test/acc") for row in rows)
    return summary


def check_checkpoint_predicts(summary: dict, data_root: Path, image_size: int) -> Classifier:
    classifier = Classifier.from_checkpoint(summary["best checkpoint"])
    assert classifier.class_names == sorted(CLASSES)
    assert classifier.module.preprocessing.crop_size == image_size
    images = [data_root / name / "0000.jpg" for name in sorted(CLASSES)]
    predictions = classifier.predict(images)
    assert [set(p.probabilities) for p in predictions] == [set(CLASSES)] * len(images)
    assert all(abs(sum(p.probabilities.values()) - 1) < 1e-4 for p in predictions)
    assert all(p.label in CLASSES for p in predictions)
    return classifier


@pytest.mark.slow
def test_feature_extract_from_the_command_line(tmp_path, shapes_dir):
    result = run_cli(
        tmp_path,
        "strategy=feature_extract",
        f"data.root={shapes_dir}",
        "data.image_size=64",
        "trainer.max_epochs=3",
        "logger=wandb",
    )
    summary = check_run(tmp_path, result, "feature_extract")
    # A real W&B offline run, with the summary pointing at it.
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert "wandb sync" in summary["W&B run"]
    classifier = check_checkpoint_predicts(summary, shapes_dir, 64)
    # Loaded without the pretrained file: the checkpoint alone restored the trained head.
    checkpoint = torch.load(summary["best checkpoint"], weights_only=True)
    assert torch.equal(classifier.module.net.head.weight, checkpoint["state_dict"]["net.head.weight"])
    assert checkpoint["hyper_parameters"]["class_names"] == sorted(CLASSES)
    assert checkpoint["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    # The prediction command prints one line per image: path, class name, probability.
    star = shapes_dir / "star" / "0001.jpg"
    printed = subprocess.run(
        [sys.executable, "-m", "transfer_learning.predict", summary["best checkpoint"], str(star)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    path, label, score = printed.stdout.strip().split("\t")
    assert (path, label) == (str(star), classifier.predict([star])[0].label)
    assert 0 < float(score) <= 1


@pytest.mark.slow
def test_finetune_from_the_command_line_with_csv_logging(tmp_path, shapes_dir):
    result = run_cli(
        tmp_path,
        "strategy=finetune",
        "strategy.backbone_lr=2e-4",
        f"data.root={shapes_dir}",
        "data.image_size=64",
        "trainer.max_epochs=2",
        "logger=csv",
    )
    summary = check_run(tmp_path, result, "finetune")
    assert not (tmp_path / "run" / "wandb").exists()
    checkpoint = torch.load(summary["best checkpoint"], weights_only=True)
    assert checkpoint["hyper_parameters"]["strategy"]["backbone_lr"] == pytest.approx(2e-4)
    check_checkpoint_predicts(summary, shapes_dir, 64)


@pytest.mark.slow
def test_default_command_generates_the_demo_data_on_first_use(tmp_path):
    result = run_cli(
        tmp_path,
        "data.generate.images_per_class=10",
        "data.generate.image_size=48",
        "data.image_size=48",
        "trainer.max_epochs=1",
        "logger=csv",
    )
    check_run(tmp_path, result, "feature_extract")
    demo = tmp_path / "data" / "demo_shapes"
    assert sorted(p.name for p in demo.iterdir()) == sorted(CLASSES)
    assert all(len(list((demo / c).glob("*.jpg"))) == 10 for c in CLASSES)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=imagefolder", "data.root=/no/such/folder"], "data.root=/no/such/folder does not exist"),
        (["model=torchvision", "model.name=resnet19"], "unknown torchvision model 'resnet19'"),
        (["model=resnet18", "model.weights=IMAGENET_V9"], "Valid: IMAGENET1K_V1, DEFAULT"),
    ],
)
def test_user_mistakes_end_in_one_clear_message(tmp_path, shapes_dir, overrides, expected):
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "logger=csv", *overrides)
    assert result.returncode == 2
    assert expected in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_torchvision_backbone_from_the_command_line_uses_the_torch_home_cache(tmp_path, shapes_dir):
    """model=resnet18 (weights DEFAULT) offline: the file in $TORCH_HOME is what gets loaded."""
    from torchvision.models import ResNet18_Weights, resnet18

    from transfer_learning.backbones.torchvision_models import torchvision_cache_file

    torch.manual_seed(11)
    state = resnet18(weights=None).state_dict()
    cache = torchvision_cache_file(ResNet18_Weights.IMAGENET1K_V1)  # under the test's TORCH_HOME
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, cache)
    result = run_cli(
        tmp_path,
        "model=resnet18",
        "strategy=feature_extract",
        f"data.root={shapes_dir}",
        "data.image_size=64",
        "trainer.max_epochs=1",
        "logger=csv",
    )
    summary = check_run(tmp_path, result, "feature_extract")
    assert summary["model"] == "resnet18"
    trained = torch.load(summary["best checkpoint"], weights_only=True)["state_dict"]
    # Feature extraction: the body in the checkpoint is exactly the cached file's tensors.
    assert torch.equal(trained["net.backbone.conv1.weight"], state["conv1.weight"])
    assert torch.equal(trained["net.backbone.layer3.0.bn1.running_var"], state["layer3.0.bn1.running_var"])
    check_checkpoint_predicts(summary, shapes_dir, 64)


@pytest.mark.slow
def test_multirun_sweeps_both_strategies(tmp_path, shapes_dir):
    result = run_cli(
        tmp_path,
        "strategy=feature_extract,finetune",
        f"hydra.sweep.dir={tmp_path}/sweep",
        f"data.root={shapes_dir}",
        "data.image_size=48",
        "trainer.max_epochs=1",
        "logger=csv",
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((tmp_path / "sweep" / str(n) / "summary.json").read_text()) for n in (0, 1)]
    assert [s["strategy"] for s in summaries] == ["feature_extract", "finetune"]
    assert all(Path(s["best checkpoint"]).is_file() for s in summaries)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_keeps_the_frozen_body_pretrained(tmp_path, shapes_dir):
    """Real DDP (gloo): per-process batches exist, metrics reduce, the body stays pretrained."""
    from transfer_learning.backbones import efficientnet_lite0

    result = run_cli(
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"data.root={shapes_dir}",
        "data.image_size=48",
        "trainer.max_epochs=2",
        "logger=csv",
    )
    summary = check_run(tmp_path, result, "feature_extract")
    assert "No training batches" not in result.stdout + result.stderr
    trained = torch.load(summary["best checkpoint"], weights_only=True)["state_dict"]
    pretrained = efficientnet_lite0(num_classes=5).backbone.state_dict()
    assert all(torch.equal(trained[f"net.backbone.{k}"], v) for k, v in pretrained.items())
    assert trained["net.head.weight"].shape == (5, 1280)
