"""The feature cache against damage: broken or foreign files are rebuilt once, NaN is never
stored or trusted, a full disk is one clear message, concurrent jobs build a key once, and
files that break after the scan are left out together with their labels."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from forkrun import start_python
from torch import nn
from torchvision import transforms as T

from helpers import REPO, build
from transfer_learning.data.datasets import ClassFolder
from transfer_learning.data.feature_cache import FeatureCache
from transfer_learning.data.images import load_rgb
from transfer_learning.errors import DataError, TransferLearningError, find_user_error, user_message

CLASSES = ["circle", "square", "star", "triangle", "cross"]
TRANSFORM = {"test": "to_tensor"}
cache_log = "transfer_learning.data.feature_cache"  # the part of the key the transform contributes


def tiny_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def folder(root: Path, per_class: int = 3, on_bad_file: str = "error") -> ClassFolder:
    """The project's dataset class over ``per_class`` images of each class under ``root``."""
    names = [p.name for p in sorted(root.iterdir()) if p.is_dir()]
    files = {name: sorted((root / name).glob("*.jpg"))[:per_class] for name in names}
    return ClassFolder(str(root), files, on_bad_file=on_bad_file, transform=T.ToTensor(), loader=load_rgb)


def cache_of(directory: Path, backbone: nn.Module | None = None, batch_size: int = 4) -> FeatureCache:
    return FeatureCache(directory, backbone or tiny_backbone(), {"model": "tiny"}, bf16=False,
                        batch_size=batch_size)  # fmt: skip


def get(cache: FeatureCache, dataset: ClassFolder, views: int = 1):
    files = [path for path, _ in dataset.samples]
    return cache.get("train", dataset, files, list(dataset.targets), transform=TRANSFORM, views=views)


def leftovers(directory: Path) -> list[str]:
    """What a cache folder holds besides cache files: temporary files, lock files."""
    return sorted(p.name for p in directory.iterdir() if p.suffix != ".npy" or p.name.startswith("."))


def cache_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".npy")


# -- damaged files are rebuilt once ----------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def header_only(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:128])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def nan_values(path: Path) -> None:
    array = np.load(path)
    array[0, 1, :] = np.nan
    np.save(path, array)


def inf_value(path: Path) -> None:
    array = np.load(path)
    array[0, -1, 0] = np.inf
    np.save(path, array)


def object_array(path: Path) -> None:
    array = np.empty((1, 15, 8), dtype=object)
    array[...] = 1.0
    np.save(path, array, allow_pickle=True)


def fewer_rows(path: Path) -> None:
    np.save(path, np.load(path)[:, :-1])


def more_views(path: Path) -> None:
    array = np.load(path)
    np.save(path, np.concatenate([array, array]))  # two views where the key says one


def float64(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float64))


def two_dimensional(path: Path) -> None:
    np.save(path, np.load(path)[0])


def fortran_order(path: Path) -> None:
    np.save(path, np.asfortranarray(np.load(path)))


DAMAGE = [truncate, header_only, random_bytes, empty, nan_values, inf_value, object_array, fewer_rows,
          more_views, float64, two_dimensional, fortran_order]  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_a_damaged_cache_file_is_rebuilt_once_with_one_warning(shapes_dir, tmp_path, caplog, damage):
    directory = tmp_path / "cache"
    dataset = folder(shapes_dir)
    fresh = get(cache_of(directory), dataset)
    (path,) = cache_files(directory)
    expected = fresh.features.clone()
    damage(path)

    cache = cache_of(directory)
    with caplog.at_level(logging.WARNING, logger=cache_log):
        features = get(cache, dataset)
    assert cache.built == {path} and cache.reused == set()
    warnings = [
        r.getMessage() for r in caplog.records if r.name == cache_log and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1 and str(path) in warnings[0] and "damaged" in warnings[0], warnings
    assert torch.equal(features.features, expected) and features.kept is None
    assert torch.equal(features.labels, torch.as_tensor(dataset.targets))
    assert np.array_equal(np.load(path, allow_pickle=False), expected.numpy())  # stored whole again
    assert cache_files(directory) == [path] and not leftovers(directory)

    again = cache_of(directory)  # the rebuilt file is trusted from now on
    assert torch.equal(get(again, dataset).features, expected)
    assert again.reused == {path} and again.built == set()


def test_a_truncated_cache_file_is_rebuilt_by_the_next_run(shapes_dir, tmp_path, caplog):
    """The reported failure, end to end: a cut-off file used to fail every later run with
    'mmap length is greater than file size'."""
    overrides = ["strategy=feature_extract", "strategy.bf16=false", "data.augment.enabled=false",
                 f"paths.feature_cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    _, datamodule = build(shapes_dir, *overrides)
    datamodule.prepare_data()
    datamodule.setup()
    expected = {name: ds.features.clone() for name, ds in datamodule.datasets.items()}
    (train_file,) = [p for p in datamodule.feature_cache.built if p.name.startswith("train-")]
    truncate(train_file)

    _, datamodule = build(shapes_dir, *overrides)
    with caplog.at_level(logging.WARNING, logger=cache_log):
        datamodule.prepare_data()
        datamodule.setup()
    cache = datamodule.feature_cache
    assert cache.built == {train_file} and len(cache.reused - cache.built) == 2
    warnings = [
        r.getMessage() for r in caplog.records if r.name == cache_log and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1 and str(train_file) in warnings[0], warnings
    for name, features in expected.items():
        assert torch.equal(datamodule.datasets[name].features, features), name


# -- non-finite features are never stored -----------------------------------------------------


class Overflow(nn.Module):
    """A backbone whose activations overflow float32 for every image."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_backbone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 1e30 * 1e30


def nan_weights() -> nn.Module:
    backbone = tiny_backbone()
    with torch.no_grad():
        backbone[0].bias[2] = float("nan")
    return backbone


@pytest.mark.parametrize(
    ("make", "cause"),
    [(nan_weights, "weights"), (Overflow, "overflow")],
    ids=["nan-weights", "overflow"],
)
def test_non_finite_features_stop_the_build_with_the_cause_and_store_nothing(
    shapes_dir, tmp_path, make, cause
):
    directory = tmp_path / "cache"
    dataset = folder(shapes_dir)
    with pytest.raises(TransferLearningError) as caught:
        get(cache_of(directory, make()), dataset)
    message = user_message(caught.value)
    assert "NaN" in message and "train" in message and cause in message, message
    assert "strategy.bf16" in message or "model.weights" in message, message  # the fix
    assert dataset.samples[0][0] in message  # names an image it happened on
    assert not directory.exists() or not cache_files(directory)


# -- a full disk is one clear message and leaves no partial file ------------------------------


def fill_disk_after(monkeypatch, room: int, error: OSError) -> None:
    """numpy's own writer, on a disk with ``room`` bytes left: it writes that much, then fails."""
    real = np.lib.format.write_array

    class Full:
        def __init__(self, f):
            self.f, self.left = f, room

        def write(self, data):
            data = memoryview(data).cast("B")
            if len(data) > self.left:
                self.f.write(data[: self.left])
                self.f.flush()
                self.left = 0
                raise error
            self.left -= len(data)
            return self.f.write(data)

    monkeypatch.setattr(np.lib.format, "write_array", lambda fp, array, **kw: real(Full(fp), array, **kw))


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), OSError("480 requested and 200 written")],
    ids=["ENOSPC", "short-write"],
)
def test_a_full_disk_names_the_folder_and_the_fix_and_leaves_no_partial_file(
    shapes_dir, tmp_path, monkeypatch, error
):
    directory = tmp_path / "cache"
    fill_disk_after(monkeypatch, 300, error)
    with pytest.raises(Exception) as caught:
        get(cache_of(directory), folder(shapes_dir))
    user_error = find_user_error(caught.value)
    assert user_error is not None, repr(caught.value)
    message = user_message(user_error)
    assert f"disk full at {directory}" in message and "paths.feature_cache_dir" in message, message
    assert "needed" in message and "free" in message, message
    assert not cache_files(directory) and not leftovers(directory)


def test_too_little_free_space_is_reported_before_writing(shapes_dir, tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    with pytest.raises(TransferLearningError, match=f"disk full at {directory}.*100 bytes free"):
        get(cache_of(directory), folder(shapes_dir))
    assert not cache_files(directory)


# -- concurrent jobs with one key build it once -----------------------------------------------

WORKER = """
import json, sys, time
from pathlib import Path
import torch
from torch import nn
from torch.utils.data import Dataset
from transfer_learning.data.feature_cache import FeatureCache

cache_dir, files_dir, ready_dir, me, count = sys.argv[1:]

class Slow(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        time.sleep(0.05)
        return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)), i % 3

torch.manual_seed(0)
backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
files = sorted(str(p) for p in Path(files_dir).iterdir())
cache = FeatureCache(cache_dir, backbone, {"model": "tiny"}, bf16=False, batch_size=4)
Path(ready_dir, me).touch()
while len(list(Path(ready_dir).iterdir())) < int(count):  # all start together
    time.sleep(0.005)
features = cache.get("train", Slow(), files, [i % 3 for i in range(12)], {"t": 1})
print(json.dumps({"built": len(cache.built), "reused": len(cache.reused),
                  "features": features.features.flatten().tolist()}))
"""


def test_concurrent_jobs_with_one_key_build_it_once(tmp_path):
    images, ready, directory = tmp_path / "images", tmp_path / "ready", tmp_path / "cache"
    images.mkdir()
    ready.mkdir()
    for i in range(12):
        (images / f"{i:02d}.bin").write_bytes(bytes([i]))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    count = 3
    jobs = [start_python([script, directory, images, ready, i, count], tmp_path, env) for i in range(count)]
    results = []
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["built"] for r in results) == [0] * (count - 1) + [1], results
    assert sorted(r["reused"] for r in results) == [0] + [1] * (count - 1), results
    assert all(r["features"] == results[0]["features"] for r in results)
    assert len(cache_files(directory)) == 1 and not leftovers(directory)


# -- files that break after the scan (data.on_bad_file=skip) ----------------------------------


@pytest.mark.parametrize(("batch_size", "views"), [(1, 1), (4, 1), (4, 2)])
def test_a_file_broken_after_the_scan_leaves_out_its_features_with_its_label(
    shapes_dir, tmp_path, batch_size, views
):
    root = tmp_path / "images"
    shutil.copytree(shapes_dir, root)
    directory = tmp_path / "cache"
    intact = get(cache_of(directory, batch_size=batch_size), folder(root, on_bad_file="skip"), views)
    assert intact.kept is None and len(intact) == 15
    stored = cache_files(directory)

    dataset = folder(root, on_bad_file="skip")
    broken = 7  # breaks between the scan and the cache build
    Path(dataset.samples[broken][0]).write_bytes(b"not an image any more")
    cache = cache_of(directory, batch_size=batch_size)
    features = get(cache, dataset, views)
    kept = [i for i in range(15) if i != broken]
    assert features.kept == kept and len(features) == 14
    assert features.labels.tolist() == [dataset.targets[i] for i in kept]
    assert torch.equal(features.features, intact.features[:, kept])  # each row still its own image
    assert cache_files(directory) == stored and not leftovers(directory)  # the partial result is not stored


def test_a_complete_build_says_so(shapes_dir, tmp_path):
    features = get(cache_of(tmp_path / "cache"), folder(shapes_dir, on_bad_file="skip"))
    assert features.kept is None and len(features) == 15


def test_a_split_whose_every_file_broke_is_a_clear_error(shapes_dir, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(shapes_dir, root)
    dataset = folder(root, per_class=1, on_bad_file="skip")
    for path, _ in dataset.samples:
        Path(path).write_bytes(b"broken")
    with pytest.raises(DataError, match="train"):
        get(cache_of(tmp_path / "cache", batch_size=2), dataset)


def test_an_unwritable_cache_folder_is_one_clear_message(shapes_dir, tmp_path, monkeypatch):
    directory = tmp_path / "cache"

    def denied(*args, **kwargs):  # what a read-only folder answers (these tests may run as root)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(directory / ".train-x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(TransferLearningError, match=f"Cannot write .*{directory}.*paths.feature_cache_dir"):
        get(cache_of(directory), folder(shapes_dir))
    assert not cache_files(directory) and not leftovers(directory)


def test_temporary_files_of_a_killed_writer_are_removed_when_the_key_is_built(shapes_dir, tmp_path):
    directory = tmp_path / "cache"
    dataset = folder(shapes_dir)
    get(cache_of(directory), dataset)
    (path,) = cache_files(directory)
    path.unlink()
    stale = directory / f".{path.stem}-k1ll3d.tmp"
    stale.write_bytes(b"\x93NUMPY half a file")
    cache = cache_of(directory)
    get(cache, dataset)
    assert cache.built == {path} and not stale.exists() and not leftovers(directory)
