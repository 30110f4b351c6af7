"""`tl-predict ckpt_path=... images=...` (`python -m transfer_learning.results.predict`) and
`Classifier`: folders, globs and bad files, batched inference, top-k, CSV/JSON output, the Python
API's inputs, and the uncertainty threshold."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from forkrun import run_python
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from transfer_learning.cli.predict import main
from transfer_learning.errors import DataError
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.results.predict import Classifier, expand_paths, tensor_to_image, threshold_file

CLASSES = ["circle", "cross", "square", "star", "triangle"]


def images(*paths: str | Path) -> str:
    """The ``images=`` argument naming ``paths``: a list, as a user types it."""
    return "images=[" + ",".join(map(str, paths)) + "]"


@pytest.fixture
def checkpoint(trained_run: Path) -> Path:
    """One tiny model trained once (48 px, one epoch), shared read-only by the tests."""
    summary = json.loads((trained_run / "summary.json").read_text())
    return Path(summary["best checkpoint"])


def mixed_folder(root: Path, shapes_dir: Path) -> dict[str, list[Path]]:
    """A folder of good images (one nested, one hidden) and bad files, plus images for a glob."""
    photos = root / "photos"
    (photos / "nested").mkdir(parents=True)
    (photos / ".hidden").mkdir()
    good = [photos / "a_star.jpg", photos / "b_circle.jpg", photos / "nested" / "c_square.jpg"]
    for path, name in zip(good, ("star", "circle", "square"), strict=True):
        shutil.copy(shapes_dir / name / "0001.jpg", path)
    shutil.copy(shapes_dir / "cross" / "0001.jpg", photos / ".hidden" / "skipped.jpg")
    (photos / "x.jpg").write_text("not an image")  # a text file named like a JPEG
    data = (shapes_dir / "triangle" / "0002.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (photos / "empty.png").write_bytes(b"")
    (photos / "notes.txt").write_text("left out, not an error: folders hold other files")
    extra = root / "extra"
    extra.mkdir()
    globbed = [extra / "d_triangle.jpg", extra / "e_cross.jpg"]
    for path, name in zip(globbed, ("triangle", "cross"), strict=True):
        shutil.copy(shapes_dir / name / "0003.jpg", path)
    bad = [photos / "x.jpg", photos / "truncated.jpg", photos / "empty.png"]
    return {"good": good, "globbed": globbed, "bad": bad}


def module_probabilities(checkpoint: Path, files: list[Path]) -> torch.Tensor:
    """The checkpoint's own probabilities, computed without predict.py: the module's logits on
    the validation preprocessing of each file, divided by the temperature the checkpoint stores."""
    from transfer_learning.data.transforms import build_transforms
    from transfer_learning.run.checkpoints import safe_load

    module = TransferLearningModule.load_for_inference(checkpoint)
    temperature = safe_load(checkpoint)["calibration"]["temperature"]
    transform = build_transforms(module.preprocessing, train=False, augment={})
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in files])
    with torch.no_grad():
        return (module(x) / temperature).softmax(-1)


# -- no checkpoint needed ------------------------------------------------------------------


def test_paths_expand_to_each_real_image_once_and_name_what_matches_nothing(tmp_path, shapes_dir):
    made = mixed_folder(tmp_path, shapes_dir)
    photos = tmp_path / "photos"
    os.symlink(made["good"][0], tmp_path / "link.jpg")
    files, bad, listing = expand_paths(
        [photos, tmp_path / "link.jpg", str(tmp_path / "extra" / "*.jpg"), str(tmp_path / "none*.png"),
         tmp_path / "missing.jpg", made["globbed"][0]]
    )  # fmt: skip
    good_in_folder = sorted([*made["good"], *made["bad"]])  # the bad ones have image extensions
    assert files == [*good_in_folder, *made["globbed"]]  # the link and the repeat counted once
    assert [(b.source, b.reason) for b in bad] == [
        (str(tmp_path / "none*.png"), "no image file matches this pattern"),
        (str(tmp_path / "missing.jpg"), "No such file or directory"),
    ]
    assert listing.other_extensions == {".txt": 1}
    # A pattern keeps image files only, as a folder walk does; matching none is an error.
    (tmp_path / "extra" / "list.txt").write_text("left out")
    files, bad, listing = expand_paths([str(tmp_path / "extra" / "*"), str(tmp_path / "extra" / "*.txt")])
    assert files == made["globbed"] and listing.other_extensions == {".txt": 2}
    assert [b.message() for b in bad] == [
        f"{tmp_path / 'extra' / '*.txt'}: no image file matches this pattern"
    ]
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert [b.message() for b in expand_paths([empty])[1]] == [f"{empty}: no image files in this folder"]


def test_image_tensors_become_the_same_picture(shapes_dir):
    image = Image.open(shapes_dir / "star" / "0001.jpg").convert("RGB")
    as_uint8 = pil_to_tensor(image)
    assert np.array_equal(np.asarray(tensor_to_image(as_uint8)), np.asarray(image))
    assert np.array_equal(np.asarray(tensor_to_image(as_uint8 / 255.0)), np.asarray(image))
    for wrong in (torch.zeros(2, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.int64)):
        with pytest.raises(ValueError, match="expected"):
            tensor_to_image(wrong)


# -- with a trained checkpoint -------------------------------------------------------------


@pytest.mark.slow
def test_a_mixed_folder_predicts_the_good_images_and_lists_the_bad_ones(
    tmp_path, shapes_dir, checkpoint, capsys
):
    made = mixed_folder(tmp_path, shapes_dir)
    missing = tmp_path / "missing.jpg"
    pattern = str(tmp_path / "extra" / "*.jpg")
    args = [f"ckpt_path={checkpoint}", images(tmp_path / "photos", missing, pattern), "top_k=2", "device=cpu"]
    expected_files = [*sorted(made["good"]), *made["globbed"]]
    reference = module_probabilities(checkpoint, expected_files)

    assert main([*args, f"output={tmp_path / 'preds.csv'}"]) == 1
    printed = capsys.readouterr()
    with open(tmp_path / "preds.csv") as f:
        rows = list(csv.DictReader(f))
    good_rows = [r for r in rows if not r["error"]]
    assert [r["file"] for r in good_rows] == [str(p) for p in expected_files]
    for row, probs in zip(good_rows, reference, strict=True):
        values = [float(row[f"prob_{name}"]) for name in CLASSES]
        assert abs(sum(values) - 1) < 1e-5
        assert values == pytest.approx(probs.tolist(), abs=1e-5)
        assert row["predicted"] == CLASSES[int(probs.argmax())] == row["top1_class"]
        assert float(row["score"]) == float(row["top1_prob"]) >= float(row["top2_prob"])
        assert row["uncertain"] == "false"  # no threshold file, no threshold=
    errors = {r["file"]: r["error"] for r in rows if r["error"]}
    assert errors == {
        str(missing): "No such file or directory",
        str(tmp_path / "photos" / "x.jpg"): errors[str(tmp_path / "photos" / "x.jpg")],
        str(tmp_path / "photos" / "truncated.jpg"): errors[str(tmp_path / "photos" / "truncated.jpg")],
        str(tmp_path / "photos" / "empty.png"): errors[str(tmp_path / "photos" / "empty.png")],
    }
    assert "cannot identify image file" in errors[str(tmp_path / "photos" / "x.jpg")]
    assert "runcated" in errors[str(tmp_path / "photos" / "truncated.jpg")]
    assert "cannot identify image file" in errors[str(tmp_path / "photos" / "empty.png")]
    # The terminal: one line per image, every bad input named on stderr with its reason.
    lines = printed.out.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[r["file"], r["predicted"]] for r in good_rows]
    assert all(line.split("\t")[3].startswith("then ") for line in lines)
    for path, reason in errors.items():
        assert f"error: cannot read image {path}: {reason}" in printed.err
    assert "left out 1 file(s) with unsupported extensions (.txt: 1)" in printed.err
    assert "5 image(s) predicted on cpu, 4 input(s) skipped" in printed.err

    # JSON: the same content, with the errors in their own list.
    assert main([*args, f"output={tmp_path / 'preds.json'}"]) == 1
    capsys.readouterr()
    data = json.loads((tmp_path / "preds.json").read_text())
    assert data["classes"] == CLASSES
    assert [p["file"] for p in data["predictions"]] == [r["file"] for r in good_rows]
    for item, row in zip(data["predictions"], good_rows, strict=True):
        assert item["predicted"] == row["predicted"] and item["uncertain"] is False
        assert abs(sum(item["probabilities"].values()) - 1) < 1e-5
        assert [e["class"] for e in item["top_k"]] == [row["top1_class"], row["top2_class"]]
        assert item["probabilities"] == pytest.approx({n: float(row[f"prob_{n}"]) for n in CLASSES}, abs=1e-8)
    assert {e["file"]: e["error"] for e in data["errors"]} == errors

    # Nothing bad: exit status 0.
    assert main([f"ckpt_path={checkpoint}", images(*made["globbed"]), "device=cpu"]) == 0


@pytest.mark.slow
def test_top_k_and_batch_size(tmp_path, shapes_dir, checkpoint, capsys):
    files = [str(shapes_dir / name / "0004.jpg") for name in CLASSES]
    outputs = {}
    for batch_size, top_k in ((2, 3), (64, 3), (1, 99)):
        out = tmp_path / f"b{batch_size}_k{top_k}.json"
        code = main([f"ckpt_path={checkpoint}", images(*files), f"batch_size={batch_size}", f"top_k={top_k}",
                     "device=cpu", f"output={out}"])  # fmt: skip
        assert code == 0
        outputs[batch_size, top_k] = json.loads(out.read_text())["predictions"]
    capsys.readouterr()
    for item in outputs[2, 3]:
        probs = [e["prob"] for e in item["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert probs[0] == item["score"] == max(item["probabilities"].values())
    # Batches of 2 (the last one of 1) give the numbers one batch of all gives.
    for small, large in zip(outputs[2, 3], outputs[64, 3], strict=True):
        assert small["probabilities"] == pytest.approx(large["probabilities"], abs=1e-5)
        assert [e["class"] for e in small["top_k"]] == [e["class"] for e in large["top_k"]]
    assert all(len(item["top_k"]) == len(CLASSES) for item in outputs[1, 99])  # capped at the classes


@pytest.mark.slow
def test_the_python_api_takes_paths_pil_images_and_tensors(shapes_dir, checkpoint, tmp_path):
    classifier = Classifier.from_checkpoint(checkpoint, device="cpu")
    path = shapes_dir / "square" / "0005.jpg"
    image = Image.open(path).convert("RGB")
    inputs = [path, str(path), image, pil_to_tensor(image), pil_to_tensor(image).float() / 255]
    predictions = classifier.predict(inputs, batch_size=2, top_k=2)
    reference = predictions[0].probabilities
    for prediction in predictions:
        # Batches of other sizes: float32 convolutions may differ in the last bits.
        assert prediction.probabilities == pytest.approx(reference, abs=1e-5)
        assert prediction.label == max(reference, key=reference.__getitem__)
        assert prediction.top_k[0][0] == prediction.label and len(prediction.top_k) == 2
    assert [p.source for p in predictions] == [str(path), str(path), "<image 2>", "<tensor 3>", "<tensor 4>"]
    assert classifier.predict([]) == []
    assert classifier.predict_files([]) == ([], [])
    # predict() raises on an unreadable file (as it always did); predict_files() skips it.
    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    with pytest.raises(DataError, match=r"cannot read image .*x\.jpg"):
        classifier.predict([path, bad])
    found, errors = classifier.predict_files([path, bad, tmp_path / "gone.png"])
    assert [p.source for p in found] == [str(path)]
    assert [(e.source, e.reason.split(":")[0]) for e in errors] == [
        (str(tmp_path / "gone.png"), "No such file or directory"),
        (str(bad), "UnidentifiedImageError"),
    ]


@pytest.mark.slow
def test_the_threshold_file_next_to_the_checkpoint_is_honoured(tmp_path, shapes_dir, checkpoint, capsys):
    ckpt = tmp_path / checkpoint.name  # a copy: the shared checkpoint's folder stays as it is
    shutil.copy(checkpoint, ckpt)
    files = [shapes_dir / name / "0006.jpg" for name in CLASSES]
    scores = [p.score for p in Classifier.from_checkpoint(ckpt, threshold=None).predict(files)]
    assert len(set(scores)) > 1, "the test needs images with different confidences"
    cut = float(np.median(scores))
    threshold_file(ckpt).write_text(json.dumps({"max_softmax_threshold": cut, "split": "val"}))
    assert threshold_file(ckpt).name == f"{ckpt.stem}.threshold.json"

    classifier = Classifier.from_checkpoint(ckpt)
    assert classifier.threshold == cut
    flagged = [p.uncertain for p in classifier.predict(files)]
    assert flagged == [s < cut for s in scores] and any(flagged) and not all(flagged)

    out = tmp_path / "preds.csv"
    assert main([f"ckpt_path={ckpt}", images(*files), "device=cpu", f"output={out}"]) == 0
    printed = capsys.readouterr()
    with open(out) as f:
        assert [r["uncertain"] == "true" for r in csv.DictReader(f)] == flagged
    marked = ["UNCERTAIN" in line for line in printed.out.strip().splitlines()]
    assert marked == flagged
    assert (
        f"{sum(flagged)} uncertain (top probability < {cut:.3f}, from {threshold_file(ckpt).name})"
        in printed.err
    )
    # threshold= wins over the file; 0 flags nothing.
    assert main([f"ckpt_path={ckpt}", images(*files), "device=cpu", "threshold=0"]) == 0
    assert "UNCERTAIN" not in capsys.readouterr().out
    # A damaged threshold file is a usage error, named.
    threshold_file(ckpt).write_text("{not json")
    assert main([f"ckpt_path={ckpt}", f"images={files[0]}", "device=cpu"]) == 2
    assert f"cannot read {threshold_file(ckpt)}: not JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_line_exit_codes(tmp_path, shapes_dir, checkpoint, capsys):
    pictures = [shapes_dir / "star" / "0007.jpg", shapes_dir / "circle" / "0007.jpg"]
    # The real entry point: one tab-separated line per image on stdout, problems on stderr.
    command = ["-m", "transfer_learning.results.predict", f"ckpt_path={checkpoint}"]
    result = run_python([*command, images(*pictures, "missing.jpg")], cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in pictures]
    _, label, score = lines[0].split("\t")
    assert label in CLASSES and 0 < float(score) <= 1
    assert "error: cannot read image missing.jpg: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
    # All good: 0. A usage error: 2, with a message and no traceback.
    assert main([f"ckpt_path={checkpoint}", images(*pictures), "device=cpu"]) == 0
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:4000])
    for ckpt, message in (
        (tmp_path / "nope.ckpt", "does not exist"),
        (truncated, "cannot read checkpoint"),
        (pictures[0], "cannot read checkpoint"),
    ):
        capsys.readouterr()
        assert main([f"ckpt_path={ckpt}", f"images={pictures[0]}"]) == 2
        assert message in capsys.readouterr().err
    for bad_arg, message in (
        ("output=preds.txt", "output=preds.txt: output must be a file name ending in .csv or .json."),
        ("top_k=0", "top_k=0: top_k must be an integer >= 1."),
        ("threshold=1.5", "threshold=1.5: threshold must be a number in [0, 1]."),
        ("topk=3", "unknown option 'topk': did you mean top_k?"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([f"ckpt_path={checkpoint}", f"images={pictures[0]}", bad_arg])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    # The old form (positional checkpoint and images, --flags): the command in the new form.
    old = ["-m", "transfer_learning.results.predict", str(checkpoint), *map(str, pictures),
           "--top-k", "3", "-o", "preds.csv"]  # fmt: skip
    result = run_python(old, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    new = f"tl-predict ckpt_path={checkpoint} {images(*pictures)!r} output=preds.csv top_k=3"
    assert result.stderr.strip().endswith(f"write: {new}"), result.stderr
    assert not (tmp_path / "preds.csv").exists()


def help_columns(shown: str, class_names: list[str], top_k: int) -> tuple[list[str], list[str]]:
    """The CSV columns ``--help`` names, single-label then multi-label, in order: ``prob_<class>``
    one column per class of ``class_names``; ``top1_class, top1_prob, ...`` each part per rank up
    to ``top_k``."""
    lists = re.findall(r"the CSV's columns: (.*?``error``)", " ".join(shown.split()))
    assert len(lists) == 2, shown
    expanded = []
    for listed in lists:
        names = re.findall(r"``([^`]+)``", listed)
        parts = [n.removeprefix("top1_") for n in names if n.startswith("top1_")]
        columns: list[str] = []
        for name in names:
            if name == "prob_<class>":
                columns += [f"prob_{c}" for c in class_names]
            elif name.startswith("top1_"):  # top1_class, top1_prob, ...: every rank's, at the first
                if name == f"top1_{parts[0]}":
                    columns += [f"top{r}_{part}" for r in range(1, top_k + 1) for part in parts]
            else:
                columns.append(name)
        expanded.append(columns)
    return expanded[0], expanded[1]


def usage() -> str:
    """``--help`` of the real command, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "transfer_learning.results.predict", "--help"],
                          capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip


def test_help_names_the_csv_columns_the_writer_writes():
    """--help's CSV columns, single- and multi-label, are the writer's own list, in order."""
    from transfer_learning.results.predict import csv_columns

    single, multi = help_columns(usage(), ["a", "b", "c"], 2)
    assert single == csv_columns(["a", "b", "c"], 2)
    assert multi == csv_columns(["a", "b", "c"], 2, multilabel=True)


@pytest.mark.slow
def test_help_names_the_columns_of_the_csv_predict_writes(tmp_path, shapes_dir, checkpoint):
    """The header of the CSV a real `tl-predict ... output=preds.csv top_k=3` writes is the list
    of columns --help gives for a single-label checkpoint."""
    pictures = [shapes_dir / "star" / "0007.jpg", shapes_dir / "circle" / "0007.jpg"]
    command = ["-m", "transfer_learning.results.predict", f"ckpt_path={checkpoint}", images(*pictures)]
    result = run_python([*command, "top_k=3", "output=preds.csv"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "preds.csv", newline="") as f:
        header = next(csv.reader(f))
    classes = TransferLearningModule.load_for_inference(checkpoint).class_names
    assert help_columns(usage(), classes, 3)[0] == header
