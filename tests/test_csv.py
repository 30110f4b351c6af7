"""Labels from a CSV (single- and multi-label), through the same data module as class folders:
the listing, the split, the messages for bad CSVs, and training from the command line."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from helpers import run_cli
from transfer_learning.data.datamodule import ImageDataModule, ImageFolderDataModule
from transfer_learning.data.datasets import samples
from transfer_learning.data.demo import CLASSES
from transfer_learning.data.sources.csv import CsvSource
from transfer_learning.data.splits import iterative_split, split_deviation
from transfer_learning.errors import ConfigError, DataError
from transfer_learning.preprocessing import Preprocessing

PREP = Preprocessing(resize_size=32, crop_size=32)


def flat_csv(shapes_dir: Path, folder: Path, header: str = "path,label", newline: str = "\n") -> Path:
    """The class-folder images copied into one folder whose names say nothing about the
    class (``img_<n>.jpg``), with a CSV of path -> label beside them."""
    (folder / "images").mkdir(parents=True)
    rows = [header]
    for n, image in enumerate(sorted(shapes_dir.glob("*/*.jpg"))):
        shutil.copy(image, folder / "images" / f"img_{n:03d}.jpg")
        rows.append(f"images/img_{n:03d}.jpg,{image.parent.name}")
    path = folder / "labels.csv"
    path.write_text(newline.join(rows) + newline, encoding="utf-8")
    return path


def csv_module(file: Path, **settings) -> ImageDataModule:
    dm = ImageDataModule(source="csv", file=str(file), batch_size=4, num_workers=0, **settings)
    dm.set_preprocessing(PREP)
    dm.setup()
    return dm


def class_counts(dm: ImageDataModule, split: str) -> Counter:
    return Counter(dm.class_names[t] for t in samples(dm.datasets[split])[1])


def test_a_csv_gives_the_same_classes_and_split_sizes_as_the_class_folders(shapes_dir, tmp_path):
    folders = ImageFolderDataModule(str(shapes_dir), batch_size=4, num_workers=0)
    folders.set_preprocessing(PREP)
    folders.setup()
    dm = csv_module(flat_csv(shapes_dir, tmp_path / "flat"))
    assert dm.task == "multiclass" and dm.class_names == folders.class_names == sorted(CLASSES)
    for split in ("train", "val", "test"):
        assert class_counts(dm, split) == class_counts(folders, split), split
    for file, label in zip(*samples(dm.datasets["val"]), strict=True):  # labels come from the CSV
        assert Path(file).parent == tmp_path / "flat" / "images"
        assert dm.class_names[label] == dm.listing.class_names[label]
    image, target = dm.datasets["train"][0]
    assert image.shape == (3, 32, 32) and target.dtype.is_floating_point is False


def test_a_split_column_is_used_as_given_and_paths_can_start_at_data_root(shapes_dir, tmp_path):
    file = flat_csv(shapes_dir, tmp_path / "flat")
    lines = file.read_text().splitlines()
    pairs = [line.split(",") for line in lines[1:]]
    rows = ["file,kind,split"] + [
        f"{p.removeprefix('images/')},{c},{('train', 'val', 'test')[i % 3]}" for i, (p, c) in enumerate(pairs)
    ]
    elsewhere = tmp_path / "elsewhere.csv"
    elsewhere.write_text("\n".join(rows) + "\n")
    dm = csv_module(
        elsewhere, root=str(tmp_path / "flat" / "images"), path_column="file", label_column="kind"
    )
    sizes = dm.split_sizes()
    assert sizes == {"train": 27, "val": 27, "test": 26}
    assert dm.datasets["test"] is not dm.datasets["val"]


def test_bom_and_crlf_line_endings_read_as_plain_csv(shapes_dir, tmp_path):
    plain = CsvSource(flat_csv(shapes_dir, tmp_path / "a")).read()
    file = flat_csv(shapes_dir, tmp_path / "b", header="\ufeffpath,label", newline="\r\n")
    assert file.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in file.read_bytes()
    odd = CsvSource(file).read()
    assert odd.class_names == plain.class_names and odd.targets == plain.targets
    assert [p.name for p in odd.files] == [p.name for p in plain.files]


def write(tmp_path: Path, text: str, images: int = 4) -> Path:
    for n in range(images):  # never decoded here (verify_images=false)
        (tmp_path / f"{n}.jpg").write_bytes(b"")
    file = tmp_path / "labels.csv"
    file.write_text(text)
    return file


@pytest.mark.parametrize(
    ("text", "setting", "expected"),
    [
        (
            "path,label\n0.jpg,cat\n1.jpg,dog\nmissing.jpg,dog\n",
            {},
            ["row 4: missing.jpg (no such file", "data.on_bad_file=skip"],
        ),
        (
            "path,label\n0.jpg,cat\n1.jpg,dog\n0.jpg,dog\n",
            {},
            ["rows 2 and 4 both name 0.jpg", "Keep one row per image"],
        ),
        ("path,label\n0.jpg,cat\n1.jpg,\n2.jpg,dog\n", {}, ["row 3: the 'label' cell is empty"]),
        (
            "path,label,split\n0.jpg,cat,train\n1.jpg,dog,train\n2.jpg,cta,val\n",
            {},
            ["row 4 (val): label 'cta' (did you mean 'cat'?) is on no train row"],
        ),
        (
            "path,labl\n0.jpg,cat\n1.jpg,dog\n",
            {},
            ["row 1 (the header) has no column 'label'", "Did you mean 'labl'? Set data.label_column=labl."],
        ),
        ("path,label\n0.jpg,cat dog\n1.jpg,dog\n", {"task": "multiclass"}, []),
        ("path,label\n0.jpg,cat\n1.jpg,dog\n", {"split_column": "fold"}, ["no column 'fold'"]),
        ("path,label,split\n0.jpg,cat,train\n1.jpg,dog,tarin\n", {}, ["row 3: split='tarin'"]),
    ],
)
def test_bad_csvs_are_refused_with_the_row_and_the_fix(tmp_path, text, setting, expected):
    file = write(tmp_path, text)
    if not expected:  # a label with a space is one class in a single-label CSV
        assert CsvSource(file, **setting).read().class_names == ["cat dog", "dog"]
        return
    dm = ImageDataModule(source="csv", file=str(file), num_workers=0, verify_images=False, **setting)
    with pytest.raises(DataError) as err:
        dm.discover()
    for part in expected:
        assert part in str(err.value), str(err.value)
    assert str(file) in str(err.value)


def test_unknown_csv_settings_and_sources_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.lable_column: data\.source=csv takes no such setting"):
        ImageDataModule(source="csv", file="x.csv", lable_column="y")
    with pytest.raises(ConfigError, match=r"data\.source='cvs' is not a data source\. Did you mean 'csv'"):
        ImageDataModule(source="cvs", file="x.csv")


def test_data_csv_without_a_file_says_which_setting_to_add():
    from transfer_learning.run.config import build, compose_config

    with pytest.raises(ConfigError, match=r"data\.file is not set: add data\.file=labels\.csv"):
        build(compose_config(["data=csv"]))


def test_missing_files_are_skipped_and_counted_with_on_bad_file_skip(shapes_dir, tmp_path):
    file = flat_csv(shapes_dir, tmp_path / "flat")
    file.write_text(file.read_text() + "images/gone.jpg,star\n")
    dm = csv_module(file, on_bad_file="skip")
    assert (
        dm.left_out == {"listed but missing": 1}
        and sum(dm.split_sizes()[s] for s in ("train", "val", "test")) == 80
    )


def test_multilabel_cells_and_flag_columns_give_the_same_listing(multilabel_dir, tmp_path):
    cells = CsvSource(multilabel_dir / "labels.csv", label_column="labels").read("multilabel")
    assert cells.task == "multilabel" and cells.class_names == sorted(CLASSES)
    assert {len(t) for t in cells.targets} == {1, 2, 3}
    rows = ["path," + ",".join(CLASSES)]
    for line in (multilabel_dir / "labels.csv").read_text().splitlines()[1:]:
        path, labels = line.split(",")
        rows.append(path + "," + ",".join("1" if c in labels.split() else "0" for c in CLASSES))
    flags = tmp_path / "flags.csv"  # elsewhere: its paths start at data.root
    flags.write_text("\n".join(rows) + "\n")
    root = multilabel_dir
    for source in (
        CsvSource(flags, task="multilabel", root=root),
        CsvSource(flags, label_columns=list(CLASSES), root=root),
    ):
        listing = source.read()
        assert listing.task == "multilabel" and listing.class_names == list(CLASSES)
        assert listing.files == cells.files and listing.targets == cells.targets


def test_a_multilabel_csv_serves_multi_hot_targets_and_pos_weights(multilabel_dir):
    dm = csv_module(
        multilabel_dir / "labels.csv", label_column="labels", task="multilabel", balance="weighted_loss"
    )
    assert dm.task == "multilabel"
    _, target = dm.datasets["train"][0]
    files, targets = samples(dm.datasets["train"])
    assert target.tolist() == [1.0 if c in targets[0] else 0.0 for c in range(5)]
    positives = Counter(c for t in targets for c in t)
    weights = dm.loss_weights()
    for c in range(5):
        assert weights[c].item() == pytest.approx((len(files) - positives[c]) / positives[c])
    assert sum(dm.split_sizes()[s] for s in ("train", "val", "test")) == 90


def test_iterative_stratification_keeps_each_label_share_closer_than_a_random_split(multilabel_dir):
    """The documented split of multi-label data, measured: the largest gap between a label's
    share in a split and in the whole set, against seeded random splits of the same sizes."""
    import numpy as np

    listing = CsvSource(multilabel_dir / "labels.csv", label_column="labels").read("multilabel")
    fractions = {"val": 0.2, "test": 0.2}
    split = iterative_split(listing.targets, fractions, 0, listing.class_names)
    assert sorted(i for part in split.values() for i in part) == list(range(90))
    sizes = {k: len(v) for k, v in split.items()}  # label demand first: sizes near the fractions
    assert all(abs(sizes[k] - n) <= 4 for k, n in {"train": 54, "val": 18, "test": 18}.items()), sizes
    ours = split_deviation(listing.targets, split, 5)
    randoms = []
    for seed in range(20):
        order = np.random.default_rng(seed).permutation(90).tolist()
        randoms.append(split_deviation(listing.targets, {"train": order[:54], "val": order[54:72],
                                                         "test": order[72:]}, 5))  # fmt: skip
    print(f"largest label-share gap: iterative {ours:.3f}, random median {np.median(randoms):.3f}")
    assert ours < 0.5 * np.median(randoms)  # measured: 0.071 against 0.211
    for part in split.values():  # every label in every split
        assert {c for i in part for c in listing.targets[i]} == set(range(5))


@pytest.mark.slow
def test_train_py_data_csv_trains_from_the_csv(shapes_dir, tmp_path):
    """The fixed command line: ``python train.py data=csv data.file=<labels.csv>``."""
    file = flat_csv(shapes_dir, tmp_path / "flat")
    result = run_cli(tmp_path, "data=csv", f"data.file={file}", "input.image_size=32", "trainer.max_epochs=2",
                     "logger=csv", "data.batch_size=16")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= summary["test/acc"] <= 1 and Path(summary["best checkpoint"]).is_file()
    assert summary["data"] == f"data.file={file}" and summary["task"] == "multiclass"


def test_a_bad_csv_stops_the_run_before_anything_is_written(tmp_path):
    file = write(tmp_path, "path,label\n0.jpg,cat\n1.jpg,dog\n0.jpg,dog\n")
    result = run_cli(tmp_path, "data=csv", f"data.file={file}", "logger=csv")
    assert result.returncode != 0
    assert "rows 2 and 4 both name 0.jpg" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
