"""Every file in conf/model/ trains on the defaults: `python train.py model=<file>`, with
`model.weights=null` where the weights would need a download, and only the work shrunk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from transfer_learning.data.demo import CLASSES, generate_shapes
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.pipelines.train import train
from transfer_learning.results.explain import gradcam
from transfer_learning.run.config import CONF_DIR, compose_config

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
# The generic configs need a name; any member of their zoo will do.
NAMES = {"torchvision": "resnet18", "timm": "mobilenetv3_small_050"}
# Bundled weights need no network; every other source would download.
OFFLINE_WEIGHTS = {"efficientnet_lite0"}
# Fixed-size models cannot take the demo's 128 px and train at their own size instead.
OWN_SIZE = {"vit_b_16": 224}
SHRINK = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=1",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "data.batch_size=4",
    "data.num_workers=0",
    "logger=csv",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh working directory whose demo data set is made small up front (the default
    config would generate 60 images per class there on first use)."""
    root = tmp_path_factory.mktemp("workdir")
    generate_shapes(root / "data" / "demo_shapes", images_per_class=6, image_size=96)
    return root


def test_the_sweep_covers_every_model_config():
    assert len(MODELS) >= 13 and {"efficientnet_lite0", "vit_b_16", "inception_v3", "timm"} <= set(MODELS)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_trains_on_the_defaults(name, workdir, monkeypatch, caplog):
    monkeypatch.chdir(workdir)
    overrides = [f"model={name}", *SHRINK]
    if name in NAMES:
        overrides.append(f"model.name={NAMES[name]}")
    if name not in OFFLINE_WEIGHTS:
        overrides.append("model.weights=null")
    cfg = compose_config(overrides, output_dir=workdir / "runs" / name)
    with caplog.at_level("INFO", logger="transfer_learning.preprocessing"):
        metrics = train(cfg)

    summary = metrics["summary"]
    size = OWN_SIZE.get(name, 128)  # conf/data/demo.yaml asks for 128 px
    assert summary["input size"] == size
    fallback = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    assert len(fallback) == (1 if name in OWN_SIZE else 0)
    assert summary["strategy"] == "feature_extract" and summary["epochs run"] == 1
    assert 0 <= summary["test/acc"] <= 1 and 0 <= summary["test/f1"] <= 1

    # The best checkpoint is a complete classifier: it predicts the demo classes at that size.
    module = TransferLearningModule.load_for_inference(metrics["best_checkpoint"])
    assert module.class_names == sorted(CLASSES) and module.preprocessing.crop_size == size
    with torch.no_grad():
        logits = module(torch.randn(2, 3, size, size))
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()
    heatmaps = gradcam(module.net, torch.randn(2, 3, size, size), [0, 1])  # its Grad-CAM layer works
    assert heatmaps.shape == (2, size, size) and torch.isfinite(heatmaps).all()
    shutil.rmtree(workdir / "runs" / name)  # up to 1 GB of checkpoints (vgg16); kept when a check fails
