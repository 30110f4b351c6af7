"""Behaviour of the ImageFolder data module: discovery, splits, transforms, errors and demo data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from transfer_learning.data.datamodule import ImageFolderDataModule
from transfer_learning.data.datasets import samples
from transfer_learning.data.demo import CLASSES, generate_shapes
from transfer_learning.data.images import load_rgb
from transfer_learning.data.splits import stratified_split
from transfer_learning.errors import ConfigError, DataError
from transfer_learning.preprocessing import Preprocessing

PREP = Preprocessing(crop_size=32, resize_size=36)
SIZE = 40


# -- helpers -------------------------------------------------------------------------------------


def write_image(path: Path, seed: int = 0, mode: str = "RGB", size: int = SIZE) -> Path:
    """A small noisy image (noise makes random crops and flips visibly change the tensor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "P":
        image = image.quantize(16)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def make_tree(root: Path, counts: dict[str, int]) -> dict[str, list[Path]]:
    """``root/<class>/<n>.jpg`` with ``counts[class]`` images per class."""
    files: dict[str, list[Path]] = {}
    for k, (name, count) in enumerate(counts.items()):
        files[name] = [write_image(root / name / f"{n:03d}.jpg", seed=100 * k + n) for n in range(count)]
    return files


def module(root: Path, **kwargs) -> ImageFolderDataModule:
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("batch_size", 4)
    return ImageFolderDataModule(str(root), **kwargs)


def ready(root: Path, **kwargs) -> ImageFolderDataModule:
    dm = module(root, **kwargs)
    dm.set_preprocessing(PREP)
    dm.setup()
    return dm


def paths(dataset) -> list[str]:
    """The file of every sample in a dataset or a Subset of one, in dataset order."""
    return samples(dataset)[0]


def samples_of(dataset) -> list[tuple[str, int]]:
    return list(zip(*samples(dataset), strict=True))


def class_of(path: str) -> str:
    return Path(path).parent.name


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- single-folder layout ------------------------------------------------------------------------

COUNTS = {"zebra": 20, "ant": 13, "mole": 7}


def test_class_names_are_sorted_folder_names(tmp_path):
    make_tree(tmp_path, COUNTS)
    (tmp_path / "notes.txt").write_text("not a class")
    dm = module(tmp_path)
    assert dm.class_names == ["ant", "mole", "zebra"]


def test_single_folder_split_is_disjoint_complete_and_stratified(tmp_path):
    files = make_tree(tmp_path, COUNTS)
    dm = ready(tmp_path, val_fraction=0.2, test_fraction=0.2)
    split = {name: paths(dm.datasets[name]) for name in ("train", "val", "test")}

    everything = [p for name in split for p in split[name]]
    assert sorted(everything) == sorted(str(p) for fs in files.values() for p in fs)
    assert len(everything) == len(set(everything))  # disjoint: nothing appears twice
    assert dm.split_sizes() == {name: len(ps) for name, ps in split.items()}

    for name in ("val", "test"):
        counts = Counter(class_of(p) for p in split[name])
        assert counts == {c: max(1, round(n * 0.2)) for c, n in COUNTS.items()}, name
    train_counts = Counter(class_of(p) for p in split["train"])
    assert train_counts == {c: n - 2 * max(1, round(n * 0.2)) for c, n in COUNTS.items()}

    # Labels agree with class_names.
    for path, label in zip(*samples(dm.datasets["val"]), strict=True):
        assert dm.class_names[label] == class_of(path)


def test_split_is_reproducible_for_a_seed_and_changes_with_it(tmp_path):
    make_tree(tmp_path, COUNTS)

    def split(seed: int) -> dict[str, list[str]]:
        dm = ready(tmp_path, seed=seed)
        return {name: paths(dm.datasets[name]) for name in ("train", "val", "test")}

    assert split(7) == split(7)
    assert split(7) != split(8)


def test_zero_test_fraction_tests_on_val(tmp_path):
    make_tree(tmp_path, {"a": 6, "b": 6})
    dm = ready(tmp_path, test_fraction=0.0, val_fraction=0.3)
    assert dm.datasets["test"] is dm.datasets["val"]
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 12


def test_zero_val_fraction_is_an_error(tmp_path):
    make_tree(tmp_path, {"a": 6, "b": 6})
    with pytest.raises(DataError, match=r"data\.val_fraction"):
        ready(tmp_path, val_fraction=0.0)


def test_setup_needs_preprocessing_first(tmp_path):
    make_tree(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(RuntimeError, match="set_preprocessing"):
        module(tmp_path).setup()


def labels_seen(dataset) -> set[int]:
    if isinstance(dataset, Subset):
        return {dataset.dataset.samples[i][1] for i in dataset.indices}
    return {label for _, label in dataset.samples}


@pytest.mark.parametrize("layout", ["single", "split"])
@pytest.mark.parametrize("hidden_images", [0, 5])
def test_hidden_folders_are_ignored_consistently(tmp_path, layout, hidden_images):
    base = tmp_path if layout == "single" else tmp_path / "train"
    make_tree(base, {"a": 5, "b": 5})
    if layout == "split":
        make_tree(tmp_path / "val", {"a": 2, "b": 2})
    (base / ".ipynb_checkpoints").mkdir()
    for n in range(hidden_images):
        write_image(base / ".ipynb_checkpoints" / f"{n}-checkpoint.jpg", seed=n)
    dm = ready(tmp_path)
    assert dm.class_names == ["a", "b"]
    for name in ("train", "val", "test"):
        assert labels_seen(dm.datasets[name]) == {0, 1}, name
        assert all(label == dm.class_names.index(class_of(p)) for p, label in samples_of(dm.datasets[name]))


def test_images_in_symlinked_subfolders_are_found(tmp_path):
    for n in range(4):
        write_image(tmp_path / "store" / "a" / f"{n}.jpg", seed=n)
        write_image(tmp_path / "store" / "b" / f"{n}.jpg", seed=10 + n)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "linked").symlink_to(tmp_path / "store" / name, target_is_directory=True)
    dm = ready(tmp_path / "data", val_fraction=0.25, test_fraction=0.25)
    assert sum(dm.split_sizes()[s] for s in ("train", "val", "test")) == 8


# -- train/val[/test] layout ---------------------------------------------------------------------


@pytest.mark.parametrize("val_name", ["val", "valid"])
def test_split_folders_are_used_as_given(tmp_path, val_name):
    make_tree(tmp_path / "train", {"cat": 5, "dog": 4})
    make_tree(tmp_path / val_name, {"cat": 2, "dog": 3})
    make_tree(tmp_path / "test", {"cat": 1, "dog": 2})
    dm = ready(tmp_path)
    assert dm.class_names == ["cat", "dog"]
    for split, folder, size in (("train", "train", 9), ("val", val_name, 5), ("test", "test", 3)):
        files = paths(dm.datasets[split])
        assert len(files) == size
        assert all(Path(p).parent.parent == tmp_path / folder for p in files), split


def test_without_test_folder_the_test_set_is_val(tmp_path):
    make_tree(tmp_path / "train", {"cat": 5, "dog": 4})
    make_tree(tmp_path / "val", {"cat": 2, "dog": 3})
    dm = ready(tmp_path)
    assert dm.datasets["test"] is dm.datasets["val"]
    assert len(dm.datasets["train"]) == 9


def test_train_without_val_splits_val_out_of_train(tmp_path):
    make_tree(tmp_path / "train", {"cat": 10, "dog": 10})
    dm = ready(tmp_path, val_fraction=0.2, test_fraction=0.2)
    split = {name: paths(dm.datasets[name]) for name in ("train", "val", "test")}
    everything = [p for ps in split.values() for p in ps]
    assert len(everything) == len(set(everything)) == 20
    assert all(Path(p).parent.parent == tmp_path / "train" for p in everything)
    for name in ("val", "test"):
        assert Counter(class_of(p) for p in split[name]) == {"cat": 2, "dog": 2}


def test_train_and_test_without_val_splits_only_val_out_of_train(tmp_path):
    make_tree(tmp_path / "train", {"cat": 10, "dog": 10})
    make_tree(tmp_path / "test", {"cat": 3, "dog": 3})
    dm = ready(tmp_path, val_fraction=0.2, test_fraction=0.2)
    train, val, test = (paths(dm.datasets[name]) for name in ("train", "val", "test"))
    assert len(train) == 16 and len(val) == 4 and len(test) == 6
    assert not set(train) & set(val)
    assert all(Path(p).parent.parent == tmp_path / "train" for p in train + val)
    assert all(Path(p).parent.parent == tmp_path / "test" for p in test)


# -- batches and transforms ----------------------------------------------------------------------


def test_train_batch_shape_dtype_normalization_and_labels(tmp_path):
    make_tree(tmp_path, {"a": 8, "b": 8, "c": 8})
    dm = ready(tmp_path, batch_size=4)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    assert images.dtype == torch.float32
    assert images.min() < 0  # normalized with the ImageNet mean/std, not raw [0, 1]
    assert labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < len(dm.class_names)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        images, labels = next(iter(loader))
        assert images.shape[1:] == (3, 32, 32)
        assert images.dtype == torch.float32


def test_eval_transforms_are_deterministic_and_train_transforms_random(tmp_path):
    make_tree(tmp_path, {"a": 8, "b": 8})
    dm = ready(tmp_path)
    first, _ = dm.datasets["val"][0]
    again, _ = dm.datasets["val"][0]
    assert torch.equal(first, again)

    torch.manual_seed(0)
    draws = [dm.datasets["train"][0][0] for _ in range(5)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_any_image_mode_loads_as_rgb(tmp_path, mode):
    suffix = ".jpg" if mode in ("L", "CMYK") else ".png"
    odd = write_image(tmp_path / "odd" / f"0{suffix}", mode=mode)
    assert Image.open(odd).mode == mode
    assert load_rgb(str(odd)).mode == "RGB"

    make_tree(tmp_path, {"plain": 4})
    for n in range(3):
        write_image(tmp_path / "odd" / f"{n + 1}{suffix}", seed=n + 1, mode=mode)
    dm = ready(tmp_path, val_fraction=0.25, test_fraction=0.25)
    for split in ("train", "val", "test"):
        for image, _ in dm.datasets[split]:
            assert image.shape == (3, 32, 32)
            assert image.dtype == torch.float32


# -- errors --------------------------------------------------------------------------------------


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        module(missing).discover()
    assert str(missing) in str(info.value)
    assert "data.root" in str(info.value)
    assert "ImageFolder" in str(info.value)


def test_root_without_class_folders(tmp_path):
    write_image(tmp_path / "loose.jpg")
    with pytest.raises(DataError) as info:
        module(tmp_path).discover()
    message = str(info.value)
    assert str(tmp_path) in message
    assert "no class folders" in message
    assert f"{tmp_path}/<class>/" in message  # shows the expected layout


def test_empty_class_folder_is_named(tmp_path):
    make_tree(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "empty_one").mkdir()
    (tmp_path / "empty_one" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        module(tmp_path).discover()
    message = str(info.value)
    assert str(tmp_path / "empty_one") in message
    assert str(tmp_path / "a") not in message
    assert "remove the folder" in message


def test_corrupt_image_is_reported_before_training(tmp_path):
    make_tree(tmp_path, {"a": 3, "b": 3})
    bad = tmp_path / "b" / "broken.jpg"
    bad.write_bytes(b"\x00this is not a jpeg\xff" * 10)
    with pytest.raises(DataError) as info:
        module(tmp_path).discover()
    message = str(info.value)
    assert str(bad) in message
    assert "data.on_bad_file=skip" in message
    assert message.startswith("1 image file(s) cannot be decoded")


def test_corrupt_image_without_verification_fails_when_loaded(tmp_path):
    make_tree(tmp_path, {"a": 4, "b": 4})
    bad = tmp_path / "b" / "broken.jpg"
    bad.write_bytes(b"garbage bytes, not an image")
    dm = ready(tmp_path, verify_images=False)  # no upfront check: discover() and setup() pass
    assert dm.class_names == ["a", "b"]

    (split, position), *_ = [
        (name, k)
        for name in ("train", "val", "test")
        for k, path in enumerate(paths(dm.datasets[name]))
        if path == str(bad)
    ]
    with pytest.raises(DataError) as info:
        dm.datasets[split][position]
    assert str(bad) in str(info.value)
    assert "Replace it, or set data.on_bad_file=skip" in str(info.value)


def test_train_and_val_with_different_classes(tmp_path):
    make_tree(tmp_path / "train", {"cat": 3, "dog": 3, "zebra": 3})
    make_tree(tmp_path / "val", {"cat": 2, "dog": 2})
    with pytest.raises(DataError) as info:
        module(tmp_path).discover()
    message = str(info.value)
    assert "zebra" in message
    assert str(tmp_path / "val") in message and str(tmp_path / "train") in message
    assert "same classes" in message


def test_only_one_class(tmp_path):
    make_tree(tmp_path, {"lonely": 5})
    with pytest.raises(DataError) as info:
        module(tmp_path).discover()
    assert "lonely" in str(info.value)
    assert "two or more" in str(info.value)


def split_error(root: Path, counts: dict[str, int]) -> str:
    """The message of the DataError that setting up a tree of ``counts`` images per class raises."""
    make_tree(root, counts)
    dm = module(root)
    dm.set_preprocessing(PREP)
    with pytest.raises(DataError) as info:
        dm.setup()
    return str(info.value)


def test_class_with_too_few_images_to_split(tmp_path):
    message = split_error(tmp_path, {"many": 10, "few": 2})
    assert "'few'" in message and "2 image(s)" in message
    assert "Add 1 more image(s) of 'few'" in message and "lower" not in message  # 3 needed: train, val, test
    assert "data.test_fraction=0 leaves out the test split" in message


def test_a_class_with_one_image_is_not_told_to_lower_the_fractions(tmp_path):
    message = split_error(tmp_path, {"many": 10, "one": 1})
    assert "Add 2 more image(s) of 'one'" in message and "leave the class out" in message
    assert "fraction" not in message


@pytest.mark.parametrize("val, test", [(0.5, 0.5), (0.7, 0.4), (1.0, 0.0), (-0.1, 0.2), (0.2, 1.0)])
def test_bad_fractions(tmp_path, val, test):
    with pytest.raises(ConfigError) as info:
        module(tmp_path, val_fraction=val, test_fraction=test)
    assert f"data.val_fraction={val}" in str(info.value)
    assert f"data.test_fraction={test}" in str(info.value)


def test_unknown_augment_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        module(tmp_path, augment={"hfilp": 0.5})
    message = str(info.value)
    assert "hfilp" in message and "data.augment" in message
    assert "hflip" in message  # lists the known keys


def test_val_folder_without_train_folder(tmp_path):
    make_tree(tmp_path / "val", {"cat": 2, "dog": 2})
    with pytest.raises(DataError) as info:
        module(tmp_path).discover()
    assert str(tmp_path) in str(info.value)
    assert "val/" in str(info.value) and "no train/" in str(info.value)


# -- demo data -----------------------------------------------------------------------------------


def demo(root: Path, **kwargs) -> ImageFolderDataModule:
    spec = {"root": str(root), "images_per_class": 4, "image_size": 32, "seed": 0, **kwargs}
    return module(root, generate=spec)


def test_demo_generation_writes_real_jpegs(tmp_path):
    root = tmp_path / "shapes"
    assert demo(root).discover() == sorted(CLASSES)
    assert sorted(p.name for p in root.iterdir()) == sorted(CLASSES)
    for name in CLASSES:
        files = sorted((root / name).iterdir())
        assert len(files) == 4
        for f in files:
            with Image.open(f) as image:
                assert image.format == "JPEG"
                assert image.size == (32, 32)
                image.load()
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no temporary folder left behind


def test_demo_generation_does_not_rewrite_existing_data(tmp_path):
    root = tmp_path / "shapes"
    demo(root).discover()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*.jpg")}
    assert demo(root, seed=1).discover() == sorted(CLASSES)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*.jpg")}
    assert after == before


def test_demo_generation_is_byte_identical_for_a_seed(tmp_path):
    demo(tmp_path / "one").discover()
    demo(tmp_path / "two").discover()
    generate_shapes(tmp_path / "three", images_per_class=4, image_size=32, seed=1)
    one = tree_files(tmp_path / "one")
    assert len(one) == 4 * len(CLASSES)
    assert tree_files(tmp_path / "two") == one
    assert tree_files(tmp_path / "three") != one


def test_mistyped_root_does_not_generate_demo_data(tmp_path):
    configured, typo = tmp_path / "shapes", tmp_path / "shapse"
    spec = {"root": str(configured), "images_per_class": 4, "image_size": 32, "seed": 0}
    dm = module(typo, generate=spec)
    with pytest.raises(DataError) as info:
        dm.discover()
    assert str(typo) in str(info.value)
    assert not configured.exists() and not typo.exists()
    assert list(tmp_path.iterdir()) == []


def test_demo_data_trains_end_to_end_through_the_loader(tmp_path):
    dm = demo(tmp_path / "shapes", images_per_class=6)
    dm.set_preprocessing(PREP)
    dm.setup()
    assert dm.split_sizes() == {"train": 20, "val": 5, "test": 5}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    assert labels.max() < len(CLASSES)


# -- stratified_split ----------------------------------------------------------------------------


LABELS = [0, 1, 2, 0, 0, 1, 2, 0, 1, 0, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2]
FRACTIONS = {"val": 0.2, "test": 0.3}


def test_stratified_split_covers_every_index_once_and_is_deterministic():
    split = stratified_split(LABELS, FRACTIONS, seed=3, class_names=["a", "b", "c"])
    assert set(split) == {"train", "val", "test"}
    everything = [i for indices in split.values() for i in indices]
    assert sorted(everything) == list(range(len(LABELS)))
    assert split == stratified_split(LABELS, FRACTIONS, seed=3, class_names=["a", "b", "c"])
    assert split != stratified_split(LABELS, FRACTIONS, seed=4, class_names=["a", "b", "c"])
    sizes = Counter(LABELS)
    for name, fraction in FRACTIONS.items():
        counts = Counter(LABELS[i] for i in split[name])
        assert counts == {c: max(1, round(n * fraction)) for c, n in sizes.items()}, name


def test_stratified_split_zero_fraction_gives_an_empty_split():
    split = stratified_split(LABELS, {"val": 0.25, "test": 0.0}, seed=0, class_names=["a", "b", "c"])
    assert split["test"] == []
    assert sorted(split["train"] + split["val"]) == list(range(len(LABELS)))


def test_stratified_split_too_few_images_names_the_class():
    with pytest.raises(DataError, match="'rare'"):
        stratified_split([0, 0, 0, 0, 1, 1], FRACTIONS, seed=0, class_names=["common", "rare"])


def test_trivial_augment_works_with_the_default_backbones_bicubic_interpolation(tmp_path):
    """TrivialAugmentWide rejects bicubic on tensors; the default backbone's recipe is bicubic."""
    from transfer_learning.data.transforms import build_transforms
    from transfer_learning.model.backbones import LITE0_PREPROCESSING
    from transfer_learning.preprocessing import resolve_input_size

    prep = resolve_input_size(LITE0_PREPROCESSING, 32)
    assert prep.interpolation == "bicubic"
    transform = build_transforms(
        prep, train=True, augment={"scale": (0.35, 1), "hflip": 0.5, "trivial_augment": True}
    )
    image = load_rgb(str(write_image(tmp_path / "a.png")))
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(40)]  # enough draws to hit rotations and shears
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outputs)
    assert len({o.sum().item() for o in outputs}) > 30
