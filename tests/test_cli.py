"""End to end through the command users type: `python train.py ...` in a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from forkrun import run_python

from helpers import check_run, run_cli
from transfer_learning.data.demo import CLASSES
from transfer_learning.results.predict import Classifier

PREDICT = ["-m", "transfer_learning.results.predict"]


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
        "input.image_size=64",
        "trainer.max_epochs=3",
        "logger=wandb",
    )
    summary = check_run(tmp_path, result, "feature_extract")
    # A quiet console: Lightning's lines once, no tips or library internals; train.log keeps them.
    console = result.stdout + result.stderr
    for noise in ("INFO:", "litlogger", "LeafSpec", "anonymous setting", "Total params", "Test metric",
                  "already configured with model summary", "][INFO] - "):  # fmt: skip
        assert noise not in console, noise
    lines = console.splitlines()
    events = [line for line in lines if line.strip("=") and not line[0].isspace() and "━" not in line]
    assert len(events) == len(set(events)), console
    log = (tmp_path / "run" / "train.log").read_text()
    assert "GPU available" in log and "Total params" in log
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
    printed = run_python(
        [*PREDICT, f"ckpt_path={summary['best checkpoint']}", f"images={star}"], cwd=tmp_path
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
        "input.image_size=64",
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
        "input.image_size=48",
        "trainer.max_epochs=1",
        "logger=csv",
    )
    check_run(tmp_path, result, "feature_extract")
    demo = tmp_path / "data" / "demo_shapes"
    assert sorted(p.name for p in demo.iterdir()) == sorted(CLASSES)
    assert all(len(list((demo / c).glob("*.jpg"))) == 10 for c in CLASSES)


@pytest.mark.slow
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

    from transfer_learning.model.backbones.torchvision_models import torchvision_cache_file

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
        "input.image_size=64",
        "trainer.max_epochs=1",
        "logger=csv",
    )
    summary = check_run(tmp_path, result, "feature_extract")
    assert summary["model"] == "resnet18"
    trained = torch.load(summary["best checkpoint"], weights_only=True)["state_dict"]
    # Feature extraction: the backbone in the checkpoint is exactly the cached file's tensors.
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
        "input.image_size=48",
        "trainer.max_epochs=1",
        "logger=csv",
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((tmp_path / "sweep" / str(n) / "summary.json").read_text()) for n in (0, 1)]
    assert [s["strategy"] for s in summaries] == ["feature_extract", "finetune"]
    assert all(Path(s["best checkpoint"]).is_file() for s in summaries)


@pytest.mark.slow
def test_fast_dev_run_writes_no_checkpoint_and_links_only_files_that_exist(tmp_path, shapes_dir):
    result = run_cli(tmp_path, "debug=fast_dev_run", f"data.root={shapes_dir}", "input.image_size=32")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best checkpoint"] == "(none saved)"
    assert list((tmp_path / "run").rglob("*.ckpt")) == []
    assert "CSV metrics" not in summary  # Lightning logs nothing in this mode
    for key in ("output dir", "confusion matrix"):
        assert Path(summary[key]).exists(), key


@pytest.mark.slow
def test_a_bare_tilde_on_the_command_line_is_the_home_folder(tmp_path, shapes_dir):
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "birds").symlink_to(shapes_dir)
    result = run_cli(
        tmp_path,
        "data=imagefolder",
        "data.root=~/data/birds",
        "input.image_size=32",
        "trainer.max_epochs=1",
        "logger=csv",
        env={"HOME": str(home)},
    )
    summary = check_run(tmp_path, result, "feature_extract")
    assert summary["classes"].startswith("5 (circle")
    missing = run_cli(tmp_path, "data=imagefolder", "data.root=~/data/owls", env={"HOME": str(home)})
    assert missing.returncode == 2 and "LexerNoViableAltException" not in missing.stderr
    assert f"data.root={home}/data/owls does not exist" in missing.stdout + missing.stderr
