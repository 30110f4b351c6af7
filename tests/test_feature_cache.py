"""The feature cache: exact, reused across runs, rebuilt when anything in its key changes."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import build, trainer
from transfer_learning.features import CachedFeatures
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.results.predict import Classifier

EXACT = [
    "strategy=feature_extract",
    "strategy.cached_batch_size=null",  # the image path's batches, for a step-by-step comparison
    "strategy.bf16=false",
    "data.augment.enabled=false",
    "scheduler=constant",
]


def cache_overrides(tmp_path) -> list[str]:
    return [f"paths.feature_cache_dir={tmp_path / 'cache'}"]


def fit_head(shapes_dir, *overrides: str) -> tuple[TransferLearningModule, L.Trainer]:
    L.seed_everything(0)
    module, datamodule = build(shapes_dir, *overrides, image_size=64)  # at 32 px features are all 0
    fit = trainer(max_epochs=3)
    fit.fit(module, datamodule)
    return module, fit


def test_cached_and_uncached_feature_extraction_train_the_same_head(shapes_dir, tmp_path):
    cached, fit = fit_head(shapes_dir, *EXACT, *cache_overrides(tmp_path))
    features = fit.datamodule.datasets["train"]
    assert isinstance(features, CachedFeatures) and features.features.abs().sum() > 0
    uncached, fit = fit_head(shapes_dir, *EXACT, "strategy.cache_features=false")
    assert not isinstance(fit.datamodule.datasets["train"], CachedFeatures)
    assert fit.global_step == 3 * 7  # 60 training images, batches of 8, the last one dropped
    L.seed_everything(0)
    initial = build(shapes_dir, *EXACT, "strategy.cache_features=false", image_size=64)[0].net.head
    assert not torch.allclose(initial.weight, cached.net.head.weight, atol=1e-3)  # the head trained
    for name in ("weight", "bias"):
        a, b = cached.net.head.state_dict()[name], uncached.net.head.state_dict()[name]
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), (name, (a - b).abs().max())
    assert torch.equal(cached.net.backbone.state_dict()["conv_stem.weight"],
                       uncached.net.backbone.state_dict()["conv_stem.weight"])  # fmt: skip


def files_in(directory) -> set[str]:
    return {p.name for p in directory.glob("*.npy")}


def test_a_second_run_reuses_the_cache_and_a_changed_image_rebuilds_its_split(shapes_dir, tmp_path):
    data = tmp_path / "images"
    shutil.copytree(shapes_dir, data)
    overrides = [*EXACT, *cache_overrides(tmp_path)]
    _, datamodule = build(data, *overrides)
    datamodule.prepare_data()
    datamodule.setup()
    first = files_in(tmp_path / "cache")
    assert len(first) == 3 and len(datamodule.feature_cache.built) == 3
    train_features = datamodule.datasets["train"].features.clone()

    _, datamodule = build(data, *overrides)
    datamodule.prepare_data()
    datamodule.setup()
    assert files_in(tmp_path / "cache") == first
    assert datamodule.feature_cache.built == set() and len(datamodule.feature_cache.reused) == 3
    assert torch.equal(datamodule.datasets["train"].features, train_features)

    # One image changes: only the file of the split that holds it is rebuilt.
    changed = sorted((data / "circle").glob("*.jpg"))[0]
    Image.new("RGB", (48, 48), (255, 0, 0)).save(changed)
    _, datamodule = build(data, *overrides)
    datamodule.prepare_data()
    datamodule.setup()
    rebuilt = {p.name for p in datamodule.feature_cache.built}
    assert len(rebuilt) == 1 and files_in(tmp_path / "cache") == first | rebuilt
    (rebuilt_file,) = rebuilt
    split = rebuilt_file.split("-")[0]
    assert str(changed) in _files(datamodule, split)


def _files(datamodule, split: str) -> list[str]:
    from transfer_learning.data.datasets import samples

    return samples(datamodule.eval_datasets()[split])[0]


def test_augmented_views_are_cached_and_picked_by_epoch(shapes_dir, tmp_path):
    _, datamodule = build(
        shapes_dir,
        "strategy=feature_extract",
        "strategy.cached_views=3",
        *cache_overrides(tmp_path),
        image_size=64,
    )
    datamodule.prepare_data()
    datamodule.setup()
    train = datamodule.datasets["train"]
    assert train.features.shape == (3, 60, 1280)
    assert not torch.equal(train.features[0], train.features[1])  # different augmentations
    seen = []
    for epoch in range(4):  # the data module reads the trainer's epoch
        datamodule.trainer = SimpleNamespace(current_epoch=epoch)
        seen.append(train[5][0])
    datamodule.trainer = None
    assert torch.equal(seen[0], train.features[0, 5]) and torch.equal(seen[3], seen[0])
    assert torch.equal(seen[1], train.features[1, 5]) and torch.equal(seen[2], train.features[2, 5])
    assert datamodule.datasets["val"].features.shape[0] == 1  # evaluation is always exact


def test_a_cached_run_checkpoint_is_a_whole_network_that_predicts_from_image_files(shapes_dir, tmp_path):
    """Saved after fitting (by hand here; train.py completes the files written while fitting,
    test_head_only.py), the checkpoint holds the whole network."""
    module, fit = fit_head(shapes_dir, "strategy=feature_extract", *cache_overrides(tmp_path))
    assert isinstance(fit.datamodule.datasets["train"], CachedFeatures)
    path = tmp_path / "cached.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert "net.backbone.conv_stem.weight" in state and state["net.head.weight"].shape == (5, 1280)

    classifier = Classifier.from_checkpoint(path)
    images = [sorted((shapes_dir / name).glob("*.jpg"))[0] for name in ("circle", "star")]
    predictions = classifier.predict(images)
    assert [set(p.probabilities) for p in predictions] == [set(classifier.class_names)] * 2
    # The image path gives the logits the head gives on the cached features of the same images.
    x = torch.stack([classifier.transform(Image.open(p).convert("RGB")) for p in images])
    module.eval()
    with torch.no_grad():
        from_images = module(x)
        from_features = module.net.head(module._frozen_features(x))
    assert torch.allclose(from_images, from_features)
    assert np.allclose(
        [p.probabilities[p.label] for p in predictions],
        from_images.softmax(-1).max(-1).values.numpy(),
        atol=1e-5,
    )


def test_the_auto_batch_on_cached_features_grows_with_the_data_and_keeps_eight_steps():
    from transfer_learning.data.loaders import cached_batch_size

    assert cached_batch_size("auto", 180, 32) == 32  # the demo set: never below data.batch_size
    assert cached_batch_size("auto", 1079, 32) == 128 and 1079 // 128 >= 8
    assert cached_batch_size("auto", 600, 32) == 75  # 8 steps of 75
    assert cached_batch_size("auto", 100_000, 32) == 128
    assert cached_batch_size(None, 100_000, 32) == 32 and cached_batch_size(512, 10, 32) == 512


@pytest.mark.parametrize("value", [0, -4, "big", 2.5, True])
def test_a_bad_cached_batch_size_names_the_setting(value):
    from transfer_learning.errors import ConfigError
    from transfer_learning.model.strategies import FeatureExtraction

    with pytest.raises(ConfigError, match=r"strategy\.cached_batch_size=.*use auto"):
        FeatureExtraction(cached_batch_size=value)


def test_a_cached_run_trains_on_the_auto_batch_and_evaluates_a_split_per_step(shapes_dir, tmp_path):
    """700 cached training rows: batches of 87 (8 steps per epoch) where images take 8; val and
    test in one step each; the summary's batch line says what the rows are."""
    from transfer_learning.data.demo import generate_shapes
    from transfer_learning.results.analysis import run_facts
    from transfer_learning.results.reporting import _batch

    root = generate_shapes(tmp_path / "many", images_per_class=200, image_size=32)
    module, datamodule = build(root, "strategy=feature_extract", *cache_overrides(tmp_path), image_size=32)
    fit = trainer(max_epochs=1, limit_val_batches=None)
    fit.fit(module, datamodule)
    assert len(datamodule.split_files["train"][0]) == 700
    assert fit.train_dataloader.batch_size == 87 and fit.num_training_batches == 8
    assert fit.num_val_batches == [1] and datamodule.val_dataloader().batch_size == 4096
    facts = run_facts(module, datamodule, fit)
    assert facts["batch/per_device"] == 87 and _batch(facts) == "87 feature vectors"


@pytest.mark.parametrize("views", [0, -1])
def test_views_must_be_positive(views):
    from transfer_learning.errors import ConfigError
    from transfer_learning.model.strategies import FeatureExtraction

    with pytest.raises(ConfigError, match=r"strategy\.cached_views"):
        FeatureExtraction(cached_views=views)
