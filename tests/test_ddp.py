"""Real DDP on CPU (gloo, two processes): what trains, and that evaluation counts each sample once."""

from __future__ import annotations

import pytest
import torch

from helpers import check_run, confusion_counts, run_cli, trainer
from transfer_learning.data.demo import generate_shapes
from transfer_learning.run.config import build, compose_config


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_keeps_the_frozen_backbone_pretrained(tmp_path, shapes_dir):
    """Real DDP (gloo): per-process batches exist, metrics reduce, the backbone stays pretrained."""
    from transfer_learning.model.backbones import efficientnet_lite0

    result = run_cli(
        tmp_path,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"data.root={shapes_dir}",
        "input.image_size=48",
        "trainer.max_epochs=2",
        "logger=csv",
    )
    summary = check_run(tmp_path, result, "feature_extract")
    assert "No training batches" not in result.stdout + result.stderr
    trained = torch.load(summary["best checkpoint"], weights_only=True)["state_dict"]
    pretrained = efficientnet_lite0(num_classes=5).backbone.state_dict()
    assert all(torch.equal(trained[f"net.backbone.{k}"], v) for k, v in pretrained.items())
    assert trained["net.head.weight"].shape == (5, 1280)
    # One process computed the feature cache; the other waited and read the same files.
    output = result.stdout + result.stderr
    for split in ("train", "val", "test"):
        assert output.count(f"Caching {split} features: 1 view") == 1, split
    assert len(list((tmp_path / "data" / ".feature_cache").glob("*.npy"))) == 3
    assert summary["feature cache"].startswith("3 built, 0 reused")


@pytest.mark.slow
def test_ddp_with_and_without_the_feature_cache_gives_the_same_test_numbers(tmp_path, shapes_dir):
    """Cached features under DDP are the features the backbone computes on the fly."""
    common = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"data.root={shapes_dir}",
              "input.image_size=64", "data.augment.enabled=false", "strategy.bf16=false",
              "trainer.max_epochs=2", "logger=csv"]  # fmt: skip
    cached = check_run(tmp_path, run_cli(tmp_path, *common), "feature_extract")
    uncached_dir = tmp_path / "uncached"
    uncached_dir.mkdir()
    result = run_cli(uncached_dir, *common, "strategy.cache_features=false")
    uncached = check_run(uncached_dir, result, "feature_extract")
    assert uncached.get("feature cache") is None
    for key in ("best val/acc", "test/acc", "test/f1"):
        assert cached[key] == pytest.approx(uncached[key], abs=1e-6), key


@pytest.mark.slow
def test_ddp_validation_and_test_count_every_sample_exactly_once(tmp_path):
    """9 validation and 9 test images on 2 processes: a padding sampler would evaluate 10."""
    root = generate_shapes(
        tmp_path / "three", images_per_class=14, image_size=48, classes=("circle", "square", "triangle")
    )
    data = [
        "data=imagefolder",
        f"data.root={root}",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
        "input.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
    ]
    result = run_cli(
        tmp_path, *data, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.max_epochs=1", "logger=csv",
    )  # fmt: skip
    summary = check_run(tmp_path, result, "feature_extract")
    assert summary["images train/val/test"] == "24/9/9"
    counts = confusion_counts(tmp_path / "run")
    assert sum(map(sum, counts)) == 9 and [sum(row) for row in counts] == [3, 3, 3]

    # The same checkpoint on one device gives the same numbers.
    datamodule, module = build(compose_config(data))
    single = trainer(limit_val_batches=None)
    (validated,) = single.validate(module, datamodule, ckpt_path=summary["best checkpoint"], verbose=False)
    (tested,) = single.test(module, datamodule, ckpt_path=summary["best checkpoint"], verbose=False)
    assert 0 < validated["val/acc"] < 1 and 0 < tested["test/acc"] < 1  # else padding could not show
    assert summary["best val/acc"] == pytest.approx(validated["val/acc"], abs=1e-6)
    assert summary["test/acc"] == pytest.approx(tested["test/acc"], abs=1e-6)
    assert summary["test/f1"] == pytest.approx(tested["test/f1"], abs=1e-6)
    assert int(module.test_confusion_matrix.sum()) == 9
    assert module.test_confusion_matrix.tolist() == counts
