"""Everything after training for multi-label runs: the report (per-class AP table and
precision-recall curves where single-label runs show the confusion matrix), W&B, eval.py
reproducing the run's test numbers, predict's label sets and the ONNX parity check."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from forkrun import run_python
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from helpers import REPO, read_wandb_run, run_cli
from transfer_learning.cli.export import ExportArgs
from transfer_learning.data.images import list_images
from transfer_learning.model.metrics import multilabel_per_class, multilabel_scores, pr_curves
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.results import export as ex
from transfer_learning.results.multilabel import label_set, multi_hot, save_pr_curves, set_mistakes
from transfer_learning.results.predict import Classifier, csv_columns, write_csv

NAMES = ["circle", "cross", "square", "star", "triangle"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def command(cwd: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("PROJECT_ROOT", None)
    return run_python([*script.split(), *args], cwd=cwd, env=env)


def thresholds_of(module: TransferLearningModule) -> list[float]:
    assert module.thresholds is not None
    return module.thresholds.tolist()


# -- without training ----------------------------------------------------------------------


def random_outputs(seed: int = 0, n: int = 60, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=generator) < 0.4).float()
    targets[0] = 0  # a sample without labels
    probs = (0.5 * targets + 0.7 * torch.rand(n, c, generator=generator)).clamp(0, 1)
    return probs, targets


def test_per_class_rows_and_scores_are_scikit_learns():
    probs, targets = random_outputs()
    thresholds = torch.tensor([0.5, 0.4, 0.6, 0.55])
    rows = multilabel_per_class(probs, targets, thresholds, ["a", "b", "c", "d"])
    called = (probs >= thresholds).numpy().astype(int)
    y, p = targets.numpy().astype(int), probs.numpy()
    for c, row in enumerate(rows):
        assert row["ap"] == pytest.approx(average_precision_score(y[:, c], p[:, c]))
        assert row["f1"] == pytest.approx(f1_score(y[:, c], called[:, c]))
        assert row["support"] == int(y[:, c].sum()) and row["threshold"] == pytest.approx(
            float(thresholds[c])
        )
    scores = multilabel_scores(probs, targets, thresholds)
    assert scores["map"] == pytest.approx(
        np.mean([average_precision_score(y[:, c], p[:, c]) for c in range(4)])
    )
    assert scores["f1"] == pytest.approx(f1_score(y, called, average="macro", zero_division=0))
    assert scores["f1_micro"] == pytest.approx(f1_score(y, called, average="micro", zero_division=0))
    assert scores["exact_match"] == pytest.approx(float((called == y).all(1).mean()))


def test_pr_curves_picture_has_every_class_and_a_class_without_positives(tmp_path):
    probs, targets = random_outputs()
    targets[:, 3] = 0
    names = ["a", "b", "c", "$x^$"]  # a "$" is not a formula
    per_class = multilabel_per_class(probs, targets, torch.full((4,), 0.5), names)
    curves = pr_curves(probs, targets, names)
    assert curves["$x^$"] == ([], []) and per_class[3]["ap"] is None
    path = save_pr_curves(curves, per_class, tmp_path / "pr.png")
    assert Image.open(path).size[0] > 400


def test_set_mistakes_lists_wrong_label_sets_worst_first():
    truth = multi_hot([(0,), (0, 1), (), (2,)], 3)
    probs = torch.tensor([[0.9, 0.1, 0.1], [0.8, 0.3, 0.2], [0.1, 0.1, 0.95], [0.2, 0.1, 0.6]])
    decided = [[0], [0], [2], [2]]
    rows = set_mistakes(["a", "b", "c", "d"], truth, probs, decided, ["x", "y", "z"], limit=3)
    assert [r["file"] for r in rows] == ["c", "b", "d"]  # |truth - p|: 0.95, 0.7, 0.4
    assert rows[0] == {"file": "c", "true": "", "predicted": "z", "confidence": pytest.approx(0.95),
                       "worst_class": "z", "correct": False}  # fmt: skip
    assert rows[1]["true"] == "x y" and rows[1]["predicted"] == "x" and not rows[1]["correct"]
    assert rows[1]["worst_class"] == "y"  # the missed label (0.3 against a true 1)
    assert rows[2]["correct"]
    assert label_set([2, 0], ["x", "y", "z"]) == "z x"


def test_csv_columns_say_predicted_not_label():
    assert csv_columns(["a", "b"], 2) == ["file", "predicted", "score", "uncertain", "top1_class",
                                          "top1_prob", "top2_class", "top2_prob", "prob_a", "prob_b",
                                          "error"]  # fmt: skip
    assert csv_columns(["a", "b"], 2, multilabel=True) == ["file", "predicted", "prob_a", "prob_b", "error"]


@pytest.fixture(scope="module")
def untrained(multilabel_dir: Path) -> TransferLearningModule:
    """A multi-label module as the one build path makes it (no training), with thresholds."""
    from transfer_learning.run.config import build, compose_config

    data = ["data=csv", f"data.file={multilabel_dir / 'labels.csv'}", "data.label_column=labels"]
    cfg = compose_config([*data, "task=multilabel", "input.image_size=32", "data.num_workers=0"])
    _, module = build(cfg)
    module.thresholds = torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7])
    return module.eval()


def test_classifier_gives_label_sets_at_the_thresholds_and_no_top_k(untrained, multilabel_dir, tmp_path):
    files = list_images(multilabel_dir / "images").files[:6]
    predictions = Classifier(untrained).predict(files, top_k=3)
    for p in predictions:
        assert p.multilabel and p.top_k == [] and not p.uncertain
        chosen = zip(NAMES, p.probabilities.values(), thresholds_of(untrained), strict=True)
        expected = [n for n, v, t in chosen if v >= t]
        assert p.labels == expected and p.label == " ".join(expected)
        assert p.score == pytest.approx(max(p.probabilities.values()))
    write_csv(tmp_path / "p.csv", predictions, [], NAMES, 3, multilabel=True)
    assert [r["predicted"] for r in read_csv(tmp_path / "p.csv")] == [p.label for p in predictions]


def test_parity_compares_sigmoid_probabilities_and_label_sets(untrained, multilabel_dir):
    files = list_images(multilabel_dir / "images").files[:4]
    exact = ex.parity(untrained, lambda batch: untrained.net(batch).detach().numpy(), files)
    assert all(r.ok and r.max_abs_probs == 0 for r in exact)
    # Logits moved by a constant change no softmax but every sigmoid: multi-label parity sees it.
    shifted = ex.parity(untrained, lambda batch: untrained.net(batch).detach().numpy() + 5.0, files)
    assert shifted[-1].max_abs_probs > 0.01 and not shifted[-1].ok
    metadata = ex.model_metadata(untrained, Path("m.ckpt"))
    assert metadata["activation"] == "sigmoid" and metadata["task"] == "multilabel"
    assert metadata["thresholds"] == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7])


# -- a trained multi-label run -------------------------------------------------------------


@pytest.fixture(scope="module")
def run(multilabel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``python train.py data=csv ... task=multilabel``: 48 px, three epochs, W&B offline."""
    base = tmp_path_factory.mktemp("multilabel_run")
    result = run_cli(
        base, "data=csv", f"data.file={multilabel_dir / 'labels.csv'}", "data.label_column=labels",
        "task=multilabel", "input.image_size=48", "data.batch_size=8", "trainer.max_epochs=3",
        "worst_samples=6", "logger=[csv,wandb]",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((base / "run" / "summary.json").read_text())
    return {"base": base, "summary": summary, "stdout": result.stdout, "folder": base / "run",
            "output": result.stdout + result.stderr}  # fmt: skip


@pytest.mark.slow
def test_the_run_reports_per_class_ap_and_pr_curves(run):
    summary, folder = run["summary"], run["folder"]
    assert summary["task"] == "multilabel"
    for key in ("best val/map", "test/map", "test/f1", "test/f1_micro", "test/exact_match"):
        assert 0.0 <= summary[key] <= 1.0, key
        assert key in run["stdout"]
    module = TransferLearningModule.load_for_inference(summary["best checkpoint"])
    # Every headline test number with its 95 % interval: exact match by Wilson, the rest by bootstrap,
    # all of them recomputed from test_predictions.json (the probabilities the test scored).
    from transfer_learning.results.intervals import intervals, wilson
    from transfer_learning.results.point_metrics import point_values
    from transfer_learning.results.test_predictions import read_test_predictions

    saved = read_test_predictions(folder / "test_predictions.json")
    assert len(saved.files) == int(summary["images train/val/test"].split("/")[2])
    thresholds = torch.tensor(saved.thresholds)
    points = point_values(saved.probs, saved.targets, True, thresholds)
    found = intervals(saved.probs, saved.targets, True, thresholds, seed=0, resamples=1000)
    right = round(points["exact_match"] * len(saved.files))
    assert found["exact_match"] == pytest.approx(wilson(right, len(saved.files)))
    for key in ("map", "f1", "exact_match", "ece"):
        assert summary[f"test/{key}"] == pytest.approx(points[key], abs=1e-5), key
        assert [summary[f"test/{key}_ci95_low"], summary[f"test/{key}_ci95_high"]] == pytest.approx(
            found[key]
        )
        assert f"test/{key} 95 %" in summary and "95 %" in run["stdout"]
    assert summary["thresholds"] == ", ".join(
        f"{n} {t:.3f}" for n, t in zip(NAMES, thresholds_of(module), strict=True)
    )
    assert not (folder / "confusion_matrix.png").exists()
    assert Image.open(summary["precision-recall curves"]).size[0] > 400
    rows = read_csv(folder / "per_class_metrics.csv")
    assert [r["class"] for r in rows] == NAMES
    assert list(rows[0]) == ["class", "ap", "precision", "recall", "f1", "support", "threshold"]
    assert sum(float(r["f1"]) for r in rows) / 5 == pytest.approx(summary["test/f1"], abs=1e-6)
    report = (folder / "report.md").read_text()
    assert "## Precision-recall curves (test)" in report and "(pr_curves.png)" in report
    assert "| class | ap | precision |" in report and "test/exact_match" in report
    worst = read_csv(folder / "val_predictions.csv")
    assert worst and set(worst[0]) == {"file", "true", "predicted", "confidence", "worst_class", "correct"}
    assert all(set(r["true"].split()) <= set(NAMES) for r in worst)
    assert all(r["worst_class"] in NAMES for r in worst)
    # The grid of wrong label sets draws each one's Grad-CAM of the class of its worst call.
    assert any(r["correct"] == "False" for r in worst)
    assert "(confident_mistakes.png)" in report and "no Grad-CAM heatmaps" not in run["output"]

    # W&B: the per-class table and the precision-recall curves as a line plot.
    (wandb_dir,) = (folder / "wandb").glob("offline-run-*")
    logged = read_wandb_run(wandb_dir)
    table = logged["tables"]["test/per_class"]
    assert table["columns"] == ["class", "ap", "precision", "recall", "f1", "support", "threshold"]
    assert [r[0] for r in table["data"]] == NAMES
    assert "_wandb.visualize.test/pr_curves_plot" in logged["config"]
    history = {key: value for row in logged["history"] for key, value in row.items()}
    for key in ("map", "f1", "exact_match", "ece"):  # the intervals, as numbers
        for end in ("low", "high"):
            assert history[f"test/{key}_ci95_{end}"] == pytest.approx(summary[f"test/{key}_ci95_{end}"]), key
    curves = logged["tables"]["test/pr_curves_plot_table"]
    assert {row[curves["columns"].index("lineKey")] for row in curves["data"]} == set(NAMES)


@pytest.mark.slow
def test_eval_reproduces_the_runs_test_numbers(run, multilabel_dir, tmp_path):
    summary = run["summary"]
    result = command(tmp_path, str(REPO / "eval.py"), f"ckpt_path={summary['best checkpoint']}",
                     f"hydra.run.dir={tmp_path}/eval", "data.num_workers=0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["task"] == "multilabel" and evaluated["split"] == "test"
    for key in ("map", "f1", "f1_micro", "exact_match"):
        assert evaluated[key] == pytest.approx(summary[f"test/{key}"], abs=1e-6), key
    assert evaluated["images"] == int(summary["images train/val/test"].split("/")[2])
    for key in ("map", "f1", "exact_match", "ece"):  # the same images: the run's intervals
        assert evaluated[f"{key}_ci95"] == pytest.approx(
            [summary[f"test/{key}_ci95_low"], summary[f"test/{key}_ci95_high"]], abs=1e-4
        ), key
    module = TransferLearningModule.load_for_inference(summary["best checkpoint"])
    assert evaluated["thresholds"] == pytest.approx(thresholds_of(module))
    predictions = read_csv(tmp_path / "eval" / "predictions.csv")
    truth = {r["path"]: r["labels"] for r in read_csv(multilabel_dir / "labels.csv")}
    for row in predictions:
        assert sorted(row["true"].split()) == sorted(
            truth[Path(row["file"]).relative_to(multilabel_dir).as_posix()].split()
        )
        probs = torch.tensor([float(row[n]) for n in NAMES])
        assert row["predicted"] == label_set(module.decide(probs[None])[0], NAMES)

    everything = command(tmp_path, str(REPO / "eval.py"), f"ckpt_path={summary['best checkpoint']}",
                         f"hydra.run.dir={tmp_path}/all", "data.num_workers=0", "split=all")  # fmt: skip
    assert everything.returncode == 0, everything.stderr[-3000:]
    assert json.loads((tmp_path / "all" / "eval.json").read_text())["images"] == len(truth)


@pytest.mark.slow
def test_predict_writes_label_sets_and_every_probability(run, multilabel_dir, tmp_path):
    checkpoint = run["summary"]["best checkpoint"]
    output = tmp_path / "preds.csv"
    folder = multilabel_dir / "images"
    result = command(tmp_path, "-m transfer_learning.results.predict", f"ckpt_path={checkpoint}",
                     f"images={folder}", f"output={output}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(output)
    files = list_images(folder).files
    assert len(rows) == len(files) and list(rows[0]) == [
        "file",
        "predicted",
        *(f"prob_{n}" for n in NAMES),
        "error",
    ]
    classifier = Classifier.from_checkpoint(checkpoint)
    expected = classifier.predict(files[:10])
    for row, prediction in zip(rows, expected, strict=False):
        assert prediction.top_k == [] and row["predicted"] == " ".join(prediction.labels or [])
        probs = [float(row[f"prob_{n}"]) for n in NAMES]
        # Another process and other batches: float32 convolutions differ in the last bits.
        assert probs == pytest.approx(list(prediction.probabilities.values()), abs=1e-5)
        thresholds = thresholds_of(classifier.module)
        chosen = zip(NAMES, prediction.probabilities.values(), thresholds, strict=True)
        called = [n for n, p, t in chosen if p >= t]
        assert prediction.labels == called
    lines = result.stdout.splitlines()
    assert len(lines) == len(files) and all(len(line.split("\t")) == 3 for line in lines)
    # The Python API writes the same CSV.
    again = tmp_path / "again.csv"
    write_csv(again, expected, [], NAMES, 1, multilabel=True)
    assert [r["predicted"] for r in read_csv(again)] == [r["predicted"] for r in rows[:10]]


@pytest.mark.slow
def test_predict_help_names_the_columns_of_the_multilabel_csv_it_writes(run, multilabel_dir, tmp_path):
    """The columns --help gives for a multi-label checkpoint's CSV (``prob_<class>``: one per
    class), in order, are the header of the CSV a real predict writes for one (it said
    ``labels`` where the CSV has ``predicted``)."""
    shown = command(tmp_path, "-m transfer_learning.results.predict", "--help")
    assert shown.returncode == 0, shown.stderr[-3000:]
    text = " ".join(shown.stdout.split())
    listed = re.search(r"A multi-label checkpoint .*?the CSV's columns: (.*?``error``)", text)
    assert listed is not None, shown.stdout
    checkpoint = run["summary"]["best checkpoint"]
    pictures = list_images(multilabel_dir / "images").files[:2]
    output = tmp_path / "preds.csv"
    result = command(tmp_path, "-m transfer_learning.results.predict", f"ckpt_path={checkpoint}",
                     f"images=[{pictures[0]},{pictures[1]}]", f"output={output}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output, newline="") as f:
        header = next(csv.reader(f))
    classes = TransferLearningModule.load_for_inference(checkpoint).class_names
    named = [
        column
        for name in re.findall(r"``([^`]+)``", listed[1])
        for column in ([f"prob_{c}" for c in classes] if name == "prob_<class>" else [name])
    ]
    assert named == header and "predicted" in header and "labels" not in header


@pytest.mark.slow
def test_onnx_export_says_sigmoid_carries_thresholds_and_passes_parity(run, multilabel_dir, tmp_path):
    checkpoint = Path(run["summary"]["best checkpoint"])
    args = ExportArgs(
        ckpt_path=checkpoint, output=tmp_path / "m.onnx", images=(str(multilabel_dir / "images"),)
    )
    path, rows = ex.export(args)
    assert all(r.ok and r.max_abs_logits <= args.atol for r in rows) and rows[-1].batch_size > 1
    module = TransferLearningModule.load_for_inference(checkpoint)
    for meta in (ex.read_metadata(path), json.loads(Path(f"{path}.json").read_text())):
        assert meta["activation"] == "sigmoid" and meta["task"] == "multilabel"
        assert meta["thresholds"] == pytest.approx(thresholds_of(module))
        assert "sigmoid" in meta["output"]


@pytest.mark.slow
def test_the_report_grid_explains_the_class_of_each_rows_worst_call(run):
    """A multi-label mistake has no single predicted class: the grid's heatmap is the Grad-CAM
    of the class its row names as the worst call (a false positive or a missed label)."""
    from transfer_learning.results.explain import explain_images
    from transfer_learning.results.finish import _explainer

    module = TransferLearningModule.load_for_inference(run["summary"]["best checkpoint"])
    worst = read_csv(run["folder"] / "val_predictions.csv")[:3]
    images = [Image.open(r["file"]).convert("RGB") for r in worst]
    drawn = _explainer(module, "worst_class")(worst, images)
    expected = explain_images(module, images, [NAMES.index(r["worst_class"]) for r in worst])
    other = explain_images(module, images, [(NAMES.index(r["worst_class"]) + 1) % 5 for r in worst])
    assert all(np.array_equal(a, b) for a, b in zip(drawn, expected, strict=True))
    assert not all(np.allclose(a, b) for a, b in zip(drawn, other, strict=True))  # the class matters
