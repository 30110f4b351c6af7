"""Hostile files and names (issue 16): FIFOs and device links among the images, a damaged scan
cache, a validation file that breaks mid-run, empty class folders next to bad files, one image
under two labels, and names made to break tables, terminal lines and spreadsheets.

The tests that could hang (a FIFO blocks whoever opens it; /dev/zero never ends) run in a child
process with a timeout and a memory cap, so that a regression fails instead of hanging."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from forkrun import run_python
from PIL import Image

from transfer_learning.data.datamodule import ImageFolderDataModule
from transfer_learning.data.datasets import samples
from transfer_learning.data.demo import generate_shapes
from transfer_learning.data.scan import scan_cache_file, scan_images
from transfer_learning.errors import DataError
from transfer_learning.preprocessing import Preprocessing
from transfer_learning.results.analysis import write_rows
from transfer_learning.results.image_grid import plot_confident_mistakes
from transfer_learning.results.predict import BadInput, Prediction, terminal_line, write_csv
from transfer_learning.results.report import write_report
from transfer_learning.results.reporting import save_confusion_matrix, save_confusion_table

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")

# Runs first in the child: after the imports, at most ~2 GB more address space, so that a read of
# /dev/zero fails with MemoryError within seconds instead of filling the machine's memory.
PRELUDE = """
import json, resource, sys
from pathlib import Path
import transfer_learning.data.images, transfer_learning.data.datamodule, transfer_learning.results.predict
pages = int(open("/proc/self/statm").read().split()[0])
resource.setrlimit(resource.RLIMIT_AS, (pages * resource.getpagesize() + (2 << 30), resource.RLIM_INFINITY))
args = json.loads(sys.argv[1])
"""


def isolated(code: str, timeout: float = 90, **args: object) -> object:
    """Run ``code`` in a child process (``args`` as a dict named ``args``); it prints its
    result as JSON on its last line. Fails, instead of hanging, when it runs past ``timeout``."""
    script = PRELUDE + textwrap.dedent(code)
    try:
        done = run_python(["-c", script, json.dumps(args, default=str)], cwd=os.getcwd(), timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: still running after {timeout} s (killed)")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def jpeg(path: Path, colour=(200, 40, 40), size=(24, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")
    return path


def hostile_class(folder: Path) -> dict[str, Path]:
    """Two good images, a FIFO named like an image and a symlink to /dev/zero named like one."""
    for i in range(2):
        jpeg(folder / f"ok_{i}.jpg", colour=(200, 40 + 10 * i, 40))
    fifo = folder / "x.jpg"
    os.mkfifo(fifo)
    zero = folder / "zero.jpg"
    zero.symlink_to("/dev/zero")
    return {"fifo": fifo, "zero": zero}


# -- 1. only regular files are read ---------------------------------------------------------


@needs_fifo
def test_the_walk_leaves_out_fifos_and_devices_and_names_them(tmp_path):
    special = hostile_class(tmp_path / "a")
    result = isolated(
        """
        from transfer_learning.data.images import list_images
        listing = list_images(Path(args["folder"]))
        print(json.dumps({"files": [p.name for p in listing.files], "notes": listing.notes()}))
        """,
        folder=tmp_path / "a",
    )
    assert result["files"] == ["ok_0.jpg", "ok_1.jpg"]
    note = next(n for n in result["notes"] if "not regular files" in n)
    assert note.startswith("left out 2 file(s) that are not regular files")
    assert str(special["fifo"]) in note and "FIFO" in note
    assert str(special["zero"]) in note and "device" in note


@needs_fifo
def test_the_scan_reports_special_files_without_reading_them(tmp_path):
    special = hostile_class(tmp_path / "a")
    good = tmp_path / "a" / "ok_0.jpg"
    result = isolated(
        """
        from transfer_learning.data.scan import scan_images
        result = scan_images([Path(f) for f in args["files"]], Path(args["cache"]), workers=2)
        print(json.dumps({"bad": result.bad, "digests": result.digests}))
        """,
        files=[special["fifo"], special["zero"], good],
        cache=tmp_path / "cache.json",
    )
    assert set(result["bad"]) == {str(special["fifo"]), str(special["zero"])}
    assert "not a regular file (a FIFO)" in result["bad"][str(special["fifo"])]
    assert "not a regular file (a character device)" in result["bad"][str(special["zero"])]
    assert list(result["digests"]) == [str(good)]


@needs_fifo
def test_discovery_completes_and_counts_special_files(tmp_path):
    root = tmp_path / "data"
    special = hostile_class(root / "a")
    for i in range(3):
        jpeg(root / "b" / f"ok_{i}.jpg", colour=(40, 40, 200 - 10 * i))
    result = isolated(
        """
        import logging
        from transfer_learning.data.datamodule import ImageFolderDataModule
        records = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        logging.getLogger().addHandler(Keep())
        dm = ImageFolderDataModule(args["root"], num_workers=0, scan_cache_dir=args["cache"])
        dm.discover()
        files = {name: [p.name for p in paths] for name, paths in dm.class_files().items()}
        print(json.dumps({"files": files, "left_out": dm.left_out, "log": records}))
        """,
        root=root,
        cache=tmp_path / "scan",
    )
    assert result["files"] == {"a": ["ok_0.jpg", "ok_1.jpg"], "b": ["ok_0.jpg", "ok_1.jpg", "ok_2.jpg"]}
    assert result["left_out"] == {"not a regular file": 2}
    assert any(str(special["fifo"]) in line and str(special["zero"]) in line for line in result["log"])


@needs_fifo
def test_predict_names_special_files_and_never_opens_them(tmp_path):
    special = hostile_class(tmp_path / "photos")
    result = isolated(
        """
        from transfer_learning.errors import DataError
        from transfer_learning.data.images import load_rgb
        from transfer_learning.results.predict.inputs import _Images, expand_paths
        files, bad, listing = expand_paths([args["folder"], args["fifo"], args["zero"]])
        loaded = [_Images([Path(args["fifo"]), Path(args["zero"])], transform=lambda x: x)[i] for i in (0, 1)]
        try:
            load_rgb(args["fifo"])
            raised = None
        except DataError as exc:
            raised = str(exc)
        print(json.dumps({
            "files": [p.name for p in files], "bad": [[b.source, b.reason] for b in bad],
            "notes": listing.notes(), "loaded": [[i, x, why] for i, x, why in loaded], "raised": raised,
        }))
        """,
        folder=tmp_path / "photos",
        fifo=special["fifo"],
        zero=special["zero"],
    )
    assert result["files"] == ["ok_0.jpg", "ok_1.jpg"]
    assert result["bad"] == [
        [str(special["fifo"]), "not a regular file (a FIFO)"],
        [str(special["zero"]), "not a regular file (a character device)"],
    ]
    assert any("not regular files" in note and str(special["fifo"]) in note for note in result["notes"])
    assert result["loaded"] == [
        [0, None, "not a regular file (a FIFO)"],
        [1, None, "not a regular file (a character device)"],
    ]
    assert result["raised"].startswith(f"cannot read image {special['fifo']}: ")
    assert "not a regular file (a FIFO)" in result["raised"]


# -- 2. a damaged scan cache --------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"[1, 2, 3]",
        os.urandom(64) + b"\xff\xfe",
        b'{"a": [1, 2, nu',
        b'{"x": 5}',
        b'{"x": [1, 2, {"k": 1}, 7]}',
    ],
    ids=["a list", "random bytes", "truncated", "entry not a list", "entry of the wrong types"],
)
def test_a_damaged_scan_cache_is_named_once_ignored_and_rebuilt(tmp_path, caplog, content):
    files = [jpeg(tmp_path / "data" / f"{i}.jpg", colour=(10 * i, 0, 0)) for i in range(3)]
    broken = tmp_path / "data" / "broken.jpg"
    broken.write_bytes(b"not an image")
    files.append(broken)
    cache = scan_cache_file(tmp_path / "scan", tmp_path / "data")
    cache.parent.mkdir()
    cache.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        result = scan_images(files, cache, workers=2)
    assert result.decoded == result.total == 4
    assert list(result.bad) == [str(broken)] and len(result.digests) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "rebuilt" in warnings[0]
    rebuilt = json.loads(cache.read_text())
    assert sorted(rebuilt) == sorted(str(f) for f in files)
    caplog.clear()
    again = scan_images(files, cache, workers=2)
    assert again.decoded == 0 and again.bad == result.bad and not caplog.records


# -- 3. a validation file that breaks before the report ------------------------------------


def test_the_report_skips_images_it_cannot_open_and_draws_the_rest(tmp_path, caplog):
    images = [jpeg(tmp_path / "val" / f"{i}.jpg", colour=(40 * i, 0, 0)) for i in range(5)]
    worst = [
        {
            "file": str(f),
            "true": "a",
            "predicted": "b",
            "confidence": 0.9 - i / 10,
            "p_true": 0.1,
            "correct": False,
        }
        for i, f in enumerate(images)
    ]
    images[0].unlink()  # deleted after training
    images[2].write_bytes(b"\xff\xd8 broken")  # overwritten with garbage after training
    with caplog.at_level(logging.WARNING):
        report = write_report(tmp_path / "run", {"model": "m", "strategy": "s"}, [], None, None, [], worst)
    text = report.read_text()
    grid = text.split("## Most confidently wrong validation images")[1]
    assert "![Most confidently wrong validation images](confident_mistakes.png)" in grid
    note = grid.split("confident_mistakes.png)")[1]
    assert "2 image(s) could not be opened" in note
    assert str(images[0]) in note and str(images[2]) in note and str(images[1]) not in note
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert str(images[0]) in logged and str(images[2]) in logged
    # The three readable images are drawn: one line of three columns (3.2 x 3.7 in at 100 dpi,
    # under a 0.55 in band for the picture's title).
    with Image.open(tmp_path / "run" / "confident_mistakes.png") as png:
        assert png.size == (960, 370 + 55)
    skipped: list[tuple[str, str]] = []
    assert plot_confident_mistakes(worst[:1], tmp_path / "none.png", skipped=skipped) is None
    assert [f for f, _ in skipped] == [str(images[0])] and not (tmp_path / "none.png").exists()


# -- 4a. empty class folders and bad files, in one message ---------------------------------


def test_empty_class_folders_and_bad_files_are_reported_together(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("a", "b"):
            for i in range(2):
                jpeg(root / split / name / f"{i}.jpg", colour=(100 * (name == "a"), 20 * i, 50))
    shutil.rmtree(root / "val" / "b")
    (root / "val" / "b").mkdir()
    (root / "val" / "b" / "readme.txt").write_text("images go here")
    bad_train = root / "train" / "a" / "broken.jpg"
    bad_train.write_bytes(b"garbage")
    bad_val = root / "val" / "a" / "cut.jpg"
    bad_val.write_bytes((root / "val" / "a" / "0.jpg").read_bytes()[:40])
    dm = ImageFolderDataModule(str(root), num_workers=0)
    with pytest.raises(DataError) as stop:
        dm.discover()
    message = str(stop.value)
    assert f"class folder(s) with no images: {root / 'val' / 'b'}" in message
    assert "2 image file(s) cannot be decoded" in message
    assert str(bad_train) in message and str(bad_val) in message


# -- 4b. one image under two labels -------------------------------------------------------


@pytest.fixture
def relabelled(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "data"
    generate_shapes(root / "train", images_per_class=5, image_size=32, classes=("circle", "star"))
    generate_shapes(root / "val", images_per_class=2, image_size=32, classes=("circle", "star"), seed=3)
    original = root / "train" / "circle" / "0001.jpg"
    copy = root / "train" / "star" / "also_a_star.jpg"
    shutil.copy(original, copy)
    return root, original, copy


def datamodule(root: Path, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(root), num_workers=0, batch_size=4, **kwargs)
    dm.set_preprocessing(Preprocessing(resize_size=32, crop_size=32))
    return dm


def test_the_same_image_in_two_training_classes_is_reported(relabelled, caplog):
    root, original, copy = relabelled
    dm = datamodule(root)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    message = next(r.getMessage() for r in caplog.records if "two classes" in r.getMessage())
    assert message.startswith("Labelling: 1 image(s) are in two classes at once")
    assert f"{original} (circle) = {copy} (star)" in message
    assert "data.drop_duplicates=true" in message
    assert len(dm.datasets["train"]) == 11  # reported, still there


def test_drop_duplicates_leaves_both_copies_of_a_relabelled_image_out(relabelled):
    root, original, copy = relabelled
    dm = datamodule(root, drop_duplicates=True)
    dm.setup()
    files, _ = samples(dm.datasets["train"])
    assert len(files) == 9 and not {str(original), str(copy)} & set(files)
    assert dm.left_out == {"same image in two classes": 2}
    assert dm.train_class_counts == [4, 5]


# -- 4c. names that would break lines and tables ------------------------------------------


def test_tabs_newlines_and_pipes_in_names_keep_lines_and_tables_whole(tmp_path):
    prediction = Prediction(
        label="cat\tdog", score=0.75, probabilities={"cat\tdog": 0.75, "x\ny": 0.25},
        top_k=[("cat\tdog", 0.75), ("x\ny", 0.25)], source="photos/a\tb\nc.jpg",
    )  # fmt: skip
    line = terminal_line(prediction, None)
    assert "\n" not in line and line.split("\t") == [
        "photos/a\\tb\\nc.jpg",
        "cat\\tdog",
        "0.750",
        "then x\\ny 0.250",
    ]

    per_class = [
        {"class": "a|b\nc", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        {"class": "$x^$", "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    ]
    image = jpeg(tmp_path / "val" / "0.jpg")
    worst = [{"file": str(image), "true": "$x^$", "predicted": "a|b\nc", "confidence": 0.8, "correct": False}]
    summary = {"model": "m", "strategy": "s", "classes": "2 (a|b\nc, $x^$)"}
    names = ["a|b\nc", "$x^$"]
    confusion = save_confusion_matrix(torch.tensor([[1, 1], [0, 1]]), names, tmp_path / "run" / "cm.png")
    report = write_report(tmp_path / "run", summary, ["data.root=/x|y\nz"], None, confusion, per_class, worst)
    lines = report.read_text().splitlines()
    table_lines = [line for line in lines if line.startswith("|")]
    for line in table_lines:  # every row of every table has its columns, no more
        cells = line.replace("\\|", "").count("|")
        assert cells in (4, 6), line  # the headline table (name, value, interval); per-class rows
    assert "| a\\|b\\nc | 0.5000 | 0.5000 | 0.5000 | 2 |" in lines
    assert "| classes | 2 (a\\|b\\nc, $x^$) |  |" in lines
    assert "- `data.root=/x|y\\nz`" in lines
    assert (tmp_path / "run" / "confident_mistakes.png").is_file()


# -- 4d. cells a spreadsheet would run ----------------------------------------------------


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_csv_cells_that_start_a_formula_are_neutralised_and_numbers_stay_numbers(tmp_path):
    rows = [
        {"class": "=HYPERLINK(\"http://x\",\"y\")", "precision": -0.5, "recall": 0.25, "support": 3,
         "note": "+1+cmd", "at": "@SUM(A1)", "minus": "-2+3", "tab": "\tx", "cr": "\rx", "plain": "cat"},
        {"class": "-1", "precision": -1.5e-7, "recall": 1.0, "support": -4,
         "note": "a=b", "at": "", "minus": "-0.25", "tab": "1e-3", "cr": None, "plain": "-inf"},
    ]  # fmt: skip
    got = read_csv(write_rows(rows, tmp_path / "rows.csv"))
    assert got[0] == list(rows[0])
    assert got[1] == ["'=HYPERLINK(\"http://x\",\"y\")", "-0.5", "0.25", "3", "'+1+cmd", "'@SUM(A1)",
                      "'-2+3", "'\tx", "'\rx", "cat"]  # fmt: skip
    # Numbers, and strings that are numbers, stay as they are.
    assert got[2] == ["-1", "-1.5e-07", "1.0", "-4", "a=b", "", "-0.25", "1e-3", "", "'-inf"]

    prediction = Prediction(
        label="=cmd", score=0.6, probabilities={"=cmd": 0.6, "@x": 0.4},
        top_k=[("=cmd", 0.6), ("@x", 0.4)], source="-photo.jpg",
    )  # fmt: skip
    path = tmp_path / "preds.csv"
    write_csv(path, [prediction], [BadInput("+bad.jpg", "=not an image")], ["=cmd", "@x"], 2)
    got = read_csv(path)
    assert got[0] == ["file", "predicted", "score", "uncertain", "top1_class", "top1_prob", "top2_class",
                      "top2_prob", "prob_=cmd", "prob_@x", "error"]  # fmt: skip
    assert got[1] == ["'-photo.jpg", "'=cmd", "0.6", "false", "'=cmd", "0.6", "'@x", "0.4", "0.6", "0.4", ""]
    assert got[2][0] == "'+bad.jpg" and got[2][-1] == "'=not an image"

    table = read_csv(
        save_confusion_table(torch.tensor([[2, 1], [0, 3]]), ["=cmd", "-x"], tmp_path / "cm.csv")
    )
    assert table == [["true \\ predicted", "'=cmd", "'-x"], ["'=cmd", "2", "1"], ["'-x", "0", "3"]]
