"""Data sanity: leakage between splits and imbalanced classes are reported, with a setting to
act on each."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from transfer_learning.data.datamodule import ImageFolderDataModule
from transfer_learning.data.datasets import samples
from transfer_learning.data.demo import generate_shapes
from transfer_learning.preprocessing import Preprocessing


def datamodule(root: Path, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(root), num_workers=0, batch_size=4, **kwargs)
    dm.set_preprocessing(Preprocessing(resize_size=32, crop_size=32))
    return dm


@pytest.fixture
def leaky(tmp_path: Path) -> tuple[Path, list[Path]]:
    """train/ and val/ folders; two val images are byte-for-byte copies of training images."""
    root = tmp_path / "leaky"
    generate_shapes(root / "train", images_per_class=6, image_size=32, classes=("circle", "star"))
    generate_shapes(root / "val", images_per_class=3, image_size=32, classes=("circle", "star"), seed=7)
    copies = [root / "val" / "circle" / "copy.jpg", root / "val" / "star" / "copy.jpg"]
    shutil.copy(root / "train" / "circle" / "0002.jpg", copies[0])
    shutil.copy(root / "train" / "star" / "0004.jpg", copies[1])
    return root, copies


def test_copies_of_training_images_in_val_are_reported_with_their_pairs(leaky, caplog):
    root, copies = leaky
    dm = datamodule(root)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    message = next(r.getMessage() for r in caplog.records if "Leakage" in r.getMessage())
    assert message.startswith("Leakage: 2 val image(s) have the same content as a training image")
    assert f"{copies[0]} = {root / 'train' / 'circle' / '0002.jpg'}" in message
    assert "data.drop_duplicates=true" in message
    assert len(dm.datasets["val"]) == 8  # reported, still there


def test_drop_duplicates_leaves_them_out_of_val(leaky):
    root, copies = leaky
    dm = datamodule(root, drop_duplicates=True)
    dm.setup()
    files, _ = samples(dm.datasets["val"])
    assert len(files) == 6 and not {str(c) for c in copies} & set(files)
    assert dm.left_out == {"copy of a training image in val": 2}


@pytest.fixture
def imbalanced(tmp_path: Path) -> Path:
    root = tmp_path / "imbalanced"
    root.mkdir()
    for name, count in (("circle", 40), ("star", 8)):
        generate_shapes(tmp_path / name, images_per_class=count, image_size=32, classes=(name,))
        (tmp_path / name / name).rename(root / name)
    return root


def test_imbalance_is_reported(imbalanced, caplog):
    dm = datamodule(imbalanced)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert dm.train_class_counts == [28, 6]
    message = next(r.getMessage() for r in caplog.records if "Imbalanced" in r.getMessage())
    assert message.startswith("Imbalanced classes: circle has 28 training images, star only 6 (4.7x)")
    assert dm.loss_weights() is None


def test_weighted_loss_weights_classes_by_inverse_frequency(imbalanced):
    dm = datamodule(imbalanced, balance="weighted_loss")
    dm.setup()
    weights = dm.loss_weights()
    assert weights.tolist() == pytest.approx([34 / (2 * 28), 34 / (2 * 6)])
    assert float((weights * torch.tensor([28.0, 6.0])).sum()) == pytest.approx(34)  # 1 per sample on average


def test_weighted_sampler_draws_each_class_about_equally(imbalanced):
    dm = datamodule(imbalanced, balance="weighted_sampler")
    dm.setup()
    torch.manual_seed(0)
    drawn = Counter()
    for _ in range(30):
        for _, labels in dm.train_dataloader():
            drawn.update(labels.tolist())
    share = drawn[1] / sum(drawn.values())
    assert 0.42 < share < 0.58, drawn  # without the sampler: 6 / 34 = 0.18


def test_a_module_trains_with_the_weighted_loss(imbalanced, shapes_dir):
    from helpers import build, trainer

    module, datamodule_ = build(imbalanced, "data.balance=weighted_loss", "data.val_fraction=0.2")
    run = trainer(max_epochs=1, limit_train_batches=1)
    run.fit(module, datamodule_)
    assert module.train_criterion.weight.tolist() == pytest.approx(datamodule_.loss_weights().tolist())
    assert module.criterion.weight is None  # validation and test losses stay unweighted
