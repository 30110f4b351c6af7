"""A corpus of bad and odd files, as users' folders hold them, and what the template makes of
each: decoded right, left out and counted, or reported before any training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_cli
from transfer_learning.data.datamodule import ImageFolderDataModule
from transfer_learning.data.datasets import samples
from transfer_learning.data.images import identity, list_images, load_rgb
from transfer_learning.data.scan import scan_cache_file, scan_images
from transfer_learning.data.skipping import skipped_positions
from transfer_learning.errors import DataError
from transfer_learning.preprocessing import Preprocessing


def jpeg(path: Path, colour=(200, 40, 40), size=(24, 24), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG", **save)
    return path


def build_corpus(root: Path) -> dict[str, Path]:
    """Two classes; class `a` holds one of each kind of file. Returns the interesting ones."""
    files = {}
    for i in range(4):
        jpeg(root / "a" / f"ok_{i}.jpg", colour=(200, 40 + i, 40))
        jpeg(root / "b" / f"ok_{i}.jpg", colour=(40, 40 + i, 200))
    a = root / "a"
    whole = (a / "ok_0.jpg").read_bytes()
    files["truncated"] = a / "truncated.jpg"
    big = jpeg(root / "tmp.jpg", size=(256, 256), quality=95)
    files["truncated"].write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    big.unlink()
    files["empty"] = a / "empty.jpg"
    files["empty"].write_bytes(b"")
    files["text"] = a / "notes.jpg"
    files["text"].write_text("this is not an image\n")
    files["png_as_jpg"] = a / "png_inside.jpg"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(files["png_as_jpg"], "PNG")
    files["gray16"] = a / "gray16.png"
    Image.fromarray(np.full((16, 16), 30000, dtype=np.uint16)).save(files["gray16"])
    files["float"] = a / "float32.tiff"
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(files["float"])
    files["alpha"] = a / "transparent.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(files["alpha"])
    files["half_alpha"] = a / "half.png"
    Image.new("LA", (8, 8), (0, 128)).save(files["half_alpha"])
    files["palette"] = a / "palette.png"
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 255, 0] * 256)
    palette.save(files["palette"], transparency=0)
    files["cmyk"] = a / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(files["cmyk"], "JPEG")
    files["rotated"] = a / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    jpeg(files["rotated"], size=(40, 20), exif=exif)
    files["tiny"] = a / "one_pixel.png"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(files["tiny"])
    (a / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 20)
    (a / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (a / ".DS_Store").write_bytes(b"\0" * 8)
    (a / "._ok_0.jpg").write_bytes(b"\0\x05\x16\x07AppleDouble")  # macOS resource fork
    jpeg(a / ".ipynb_checkpoints" / "ok_0-checkpoint.jpg")
    jpeg(root / "__MACOSX" / "a" / "x.jpg")
    (a / "loop").symlink_to("..")  # train/circle/loop -> .. : the data root again
    (a / "again.jpg").symlink_to("ok_0.jpg")  # the same file twice
    (a / "dangling.jpg").symlink_to("missing.jpg")
    (a / "other_class").symlink_to(root / "b")  # would label b's images as a
    assert whole
    return files


def module(root: Path, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(root), num_workers=0, val_fraction=0.25, test_fraction=0.0, **kwargs)
    dm.set_preprocessing(Preprocessing(resize_size=32, crop_size=32))
    return dm


def test_the_walk_counts_every_real_file_once_and_says_what_it_left_out(tmp_path):
    files = build_corpus(tmp_path)
    fence = {identity(tmp_path / "b")}  # the other class: discovery fences off every class folder
    listing = list_images(tmp_path / "a", boundaries=fence)
    names = sorted(p.name for p in listing.files)
    assert names == sorted(
        [f"ok_{i}.jpg" for i in range(4)]
        + [p.name for k, p in files.items()]  # the bad ones too: the scan decides about them
    )
    assert dict(listing.other_extensions) == {".gif": 1, ".heic": 1}
    assert any(loop.startswith(f"{tmp_path / 'a' / 'loop'} -> ..") for loop in listing.loops)
    assert any(loop.startswith(f"{tmp_path / 'a' / 'other_class'} -> ") for loop in listing.loops)
    assert any("dangling.jpg -> missing.jpg" in loop for loop in listing.loops)
    assert listing.repeated == 1  # again.jpg is ok_0.jpg


def test_discovery_ignores_hidden_entries_and_fences_off_other_classes(tmp_path):
    build_corpus(tmp_path)
    dm = module(tmp_path, verify_images=False)
    assert dm.class_names == ["a", "b"]  # no __MACOSX class
    a_files = {p.name for p in dm.class_files()["a"]}
    assert not any(name.startswith(".") or "checkpoint" in name for name in a_files)
    assert not {f"ok_{i}.jpg" for i in range(4)} - {p.name for p in dm.class_files()["b"]}
    assert all(p.parent.name == "a" for p in dm.class_files()["a"])  # nothing of b via the link
    assert dm.left_out == {"unsupported extension": 2}


def test_the_scan_reports_each_bad_file_and_the_policy_decides(tmp_path):
    files = build_corpus(tmp_path)
    with pytest.raises(DataError) as stop:
        module(tmp_path).discover()
    message = str(stop.value)
    assert message.startswith("3 image file(s) cannot be decoded")
    for kind in ("truncated", "empty", "text"):
        assert str(files[kind]) in message, kind
    assert "truncated" in message.split(str(files["truncated"]))[1].splitlines()[0]
    assert "data.on_bad_file=skip" in message

    dm = module(tmp_path, on_bad_file="skip")
    dm.discover()
    assert dm.left_out == {"unsupported extension": 2, "cannot be decoded": 3}
    kept = {p.name for p in dm.class_files()["a"]}
    assert not {files[k].name for k in ("truncated", "empty", "text")} & kept
    assert {files[k].name for k in ("gray16", "float", "alpha", "cmyk", "rotated", "tiny")} <= kept


def test_odd_images_decode_to_what_they_show(tmp_path):
    files = build_corpus(tmp_path)
    pixel = {k: load_rgb(files[k]).getpixel((0, 0)) for k in files if k not in ("truncated", "empty", "text")}
    assert pixel["gray16"] == (117, 117, 117)  # 30000 / 65535 of full scale, not clipped to white
    assert pixel["float"] == (128, 128, 128)  # 0.5 of full scale
    assert pixel["alpha"] == (255, 255, 255)  # fully transparent red: the white background
    assert pixel["half_alpha"] == (127, 127, 127)  # black at half opacity on white
    assert pixel["palette"] == (255, 255, 255)  # the transparent palette entry
    assert pixel["png_as_jpg"] == (1, 2, 3)
    assert pixel["cmyk"][0] > 200 and pixel["cmyk"][1] < 60  # red
    assert load_rgb(files["rotated"]).size == (20, 40)  # EXIF orientation applied
    assert pixel["tiny"] == (9, 9, 9)


def test_a_second_scan_decodes_only_new_or_changed_files(tmp_path):
    files = build_corpus(tmp_path / "data")
    listing = list_images(tmp_path / "data" / "a", boundaries={identity(tmp_path / "data" / "b")})
    cache = scan_cache_file(tmp_path / "scan", tmp_path / "data")
    first = scan_images(listing.files, cache)
    assert first.decoded == first.total == len(listing.files) and len(first.bad) == 3
    second = scan_images(listing.files, cache)
    assert second.decoded == 0 and second.bad == first.bad
    os.utime(files["gray16"], ns=(1, 1))  # a changed file is decoded again
    files["text"].write_bytes(files["png_as_jpg"].read_bytes())  # and a repaired one passes
    third = scan_images(listing.files, cache)
    assert third.decoded == 2 and set(third.bad) == {str(files["truncated"]), str(files["empty"])}


def test_a_file_that_breaks_after_the_scan_follows_the_policy(tmp_path):
    build_corpus(tmp_path)
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg"):
        (tmp_path / "a" / name).unlink()
    for policy in ("error", "skip"):
        dm = module(tmp_path, on_bad_file=policy)
        dm.setup()
        train = dm.datasets["train"]
        files, _ = samples(train)
        victim = files.index(next(f for f in files if f.endswith("ok_1.jpg") or f.endswith("ok_2.jpg")))
        Path(files[victim]).write_bytes(b"broken later")
        if policy == "error":
            with pytest.raises(DataError, match=r"cannot read image .*ok_\d\.jpg.*data\.on_bad_file=skip"):
                train[victim]
        else:  # left out with its label, never replaced by another image
            assert train[victim] is None and skipped_positions(train) == [victim]
            assert train[victim + 1 if victim + 1 < len(train) else 0][0].shape == (3, 32, 32)
        jpeg(Path(files[victim]))


@pytest.mark.slow
def test_a_run_with_on_bad_file_skip_completes_and_counts_them(tmp_path):
    build_corpus(tmp_path / "corpus")
    result = run_cli(
        tmp_path, "data=imagefolder", f"data.root={tmp_path / 'corpus'}", "data.on_bad_file=skip",
        "input.image_size=48", "trainer.max_epochs=1", "logger=csv", "data.val_fraction=0.25",
        "data.test_fraction=0.25",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["files left out"] == "2 (unsupported extension), 3 (cannot be decoded)"
    assert sum(int(n) for n in summary["images train/val/test"].split("/")) == 8 + 9  # ok + odd but fine
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Leaving out 3 image file(s) that cannot be decoded" in log and "symlink loop" in log

    second = tmp_path / "second"
    second.mkdir()
    stopped = run_cli(second, "data=imagefolder", f"data.root={tmp_path / 'corpus'}", "logger=csv")
    assert stopped.returncode == 2
    output = stopped.stdout + stopped.stderr
    assert "3 image file(s) cannot be decoded" in output and "Traceback" not in output
    assert not list((second / "run").glob("checkpoints/*"))  # stopped before any training


def test_a_bad_file_in_a_loader_worker_reaches_the_user_as_one_message(tmp_path):
    from torch.utils.data import DataLoader

    from transfer_learning.errors import find_user_error, user_message

    build_corpus(tmp_path)
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg"):
        (tmp_path / "a" / name).unlink()
    dm = module(tmp_path)
    dm.setup()
    files, _ = samples(dm.datasets["val"])
    Path(files[0]).write_bytes(b"broken after the scan")
    batches = iter(DataLoader(dm.datasets["val"], batch_size=2, num_workers=1))
    with pytest.raises(Exception) as raised:
        next(batches)
    batches._shutdown_workers()  # now: left to garbage collection, its worker took 5 s to stop
    error = find_user_error(raised.value)
    assert isinstance(error, DataError)
    assert "Original Traceback" in str(error)  # how torch hands over a worker's exception
    message = user_message(error)
    assert message.startswith(f"cannot read image {files[0]}") and "Traceback" not in message
    assert message.endswith("or set data.on_bad_file=skip to train on without such files.")
