"""report.md: every part present, the pictures valid PNGs sized for the number of classes."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import check_run, run_cli
from transfer_learning.data.demo import generate_shapes
from transfer_learning.results.report import epoch_curves, write_report
from transfer_learning.results.reporting import save_confusion_matrix

SECTIONS = (
    "## Settings that differ from the defaults",
    "## Learning curves",
    "## Learning rate of each param group",
    "## Confusion matrix (test, rows normalised)",
    "## Per-class metrics (test)",
    "## Most confidently wrong validation images",
)


def linked_pictures(report: Path) -> list[Path]:
    return [report.parent / link for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())]


def write_metrics(path: Path, epochs: int, groups: list[str]) -> None:
    """A CSV like the CSV logger writes: per-step lr rows, per-epoch train and val rows."""
    columns = ["epoch", "step", "train/loss_epoch", "train/acc", "val/loss", "val/acc"] + [
        f"lr-AdamW/{g}" for g in groups
    ]
    rows = []
    for epoch in range(epochs):
        for step in range(epoch * 4, epoch * 4 + 4):
            rates = {f"lr-AdamW/{g}": 0.0 if g != "head" and epoch == 0 else 1e-3 / (i + 1)
                     for i, g in enumerate(groups)}  # fmt: skip
            rows.append({"step": step, **rates})
        rows.append(
            {
                "epoch": epoch,
                "step": epoch * 4 + 3,
                "val/loss": 1.0 / (epoch + 1),
                "val/acc": 0.5 + 0.1 * epoch,
            }
        )
        rows.append(
            {
                "epoch": epoch,
                "step": epoch * 4 + 3,
                "train/loss_epoch": 1.2 / (epoch + 1),
                "train/acc": 0.4 + 0.1 * epoch,
            }
        )
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("classes", [5, 10, pytest.param(100, marks=pytest.mark.slow)])
def test_the_report_has_every_part_and_pictures_sized_for_the_classes(tmp_path, classes):
    names = [f"class{i:03d}" for i in range(classes)]
    matrix = torch.randint(0, 3, (classes, classes)) + 10 * torch.eye(classes, dtype=torch.long)
    confusion = save_confusion_matrix(matrix, names, tmp_path / "confusion_matrix.png")
    write_metrics(tmp_path / "metrics.csv", epochs=3, groups=["backbone", "head"])
    images = generate_shapes(tmp_path / "images", images_per_class=2, image_size=48)
    files = sorted(images.rglob("*.jpg"))
    worst = [{"file": str(f), "true": "circle", "predicted": "star", "confidence": 0.9 - i / 100,
              "p_true": 0.05, "correct": i % 3 == 2} for i, f in enumerate(files)]  # fmt: skip
    per_class = [{"class": n, "precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 4} for n in names]
    summary = {"model": "efficientnet_lite0", "strategy": "finetune", "test/acc": 0.75}
    report = write_report(tmp_path, summary, ["strategy=finetune", "trainer.max_epochs=3"],
                          tmp_path / "metrics.csv", confusion, per_class, worst)  # fmt: skip
    text = report.read_text()
    assert all(section in text for section in SECTIONS)
    assert "- `strategy=finetune`" in text and "| test/acc | 0.7500 |" in text
    assert text.count("| class | precision") == 1
    assert len(re.findall(r"^\| class\d{3} \|", text, re.M)) == classes
    pictures = linked_pictures(report)
    assert {p.name for p in pictures} == {"learning_curves.png", "learning_rates.png", "confusion_matrix.png",
                                          "confident_mistakes.png"}  # fmt: skip
    sizes = {p.name: Image.open(p).size for p in pictures}
    for picture in pictures:
        Image.open(picture).verify()
    assert sizes["learning_curves.png"][0] >= 1000 and sizes["learning_rates.png"][0] >= 900
    width = sizes["confusion_matrix.png"][0]
    assert 500 < width <= 2700 and (width > 2000) is (classes == 100)  # grows with the classes, capped
    wrong = sum(not r["correct"] for r in worst)
    assert sizes["confident_mistakes.png"][1] >= 300 * (
        (min(wrong, 16) + 3) // 4
    )  # a grid row per 4 mistakes


def test_epoch_curves_read_each_epochs_last_values():
    rows = [{"epoch": "0", "val/acc": "0.5"}, {"epoch": "0", "train/acc": "0.4", "train/loss_epoch": "1.2"},
            {"epoch": "1", "val/acc": "0.7", "val/loss": "nan"}, {"epoch": "", "val/acc": "0.9"}]  # fmt: skip
    curves = epoch_curves(rows)
    assert (
        curves["val/acc"] == {0: 0.5, 1: 0.7}
        and curves["train/loss"] == {0: 1.2}
        and curves["val/loss"] == {}
    )


@pytest.mark.slow
def test_a_training_run_writes_its_report_next_to_its_checkpoints(tmp_path, shapes_dir):
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "input.image_size=48", "strategy=gradual_unfreeze",
                     "trainer.max_epochs=2", "logger=csv")  # fmt: skip
    summary = check_run(tmp_path, result, "gradual_unfreeze")
    report = Path(summary["report"])
    assert report == tmp_path / "run" / "report.md" and "report" in result.stdout
    text = report.read_text()
    assert all(section in text for section in SECTIONS)
    assert "- `strategy=gradual_unfreeze`" in text and "- `trainer.max_epochs=2`" in text
    for picture in linked_pictures(report):
        with Image.open(picture) as image:
            image.verify()
    with open(tmp_path / "run" / "per_class_metrics.csv") as f:
        for row in csv.DictReader(f):
            assert f"| {row['class']} | {float(row['precision']):.4f} | {float(row['recall']):.4f} |" in text


def _drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the report saves, kept open for inspection."""
    from transfer_learning.results import image_grid, report

    figures: list = []

    def keep(fig, path, plt):
        fig.canvas.draw()
        figures.append(fig)
        return path

    for module in (report, image_grid):  # the curves; the grids of images
        monkeypatch.setattr(module, "save_figure", keep)
    return figures


def test_mistake_titles_clear_the_row_above_and_curves_say_what_trained(tmp_path, monkeypatch):
    """Two-line titles over portrait photos do not overlap the images above them; the learning
    curves of a run on cached features do not claim augmented batches."""
    from transfer_learning.results.image_grid import plot_confident_mistakes
    from transfer_learning.results.report import plot_learning_curves

    figures = _drawn(monkeypatch)
    rows = []
    for i in range(8):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (200, 400), (30 * i, 90, 90)).save(path)
        rows.append({"file": str(path), "true": "triangle", "predicted": "circle with a long name",
                     "confidence": 0.9 - i / 100, "correct": False})  # fmt: skip
    plot_confident_mistakes(rows, tmp_path / "m.png")
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    images = [(im.ox, im.oy, im.oy + im.get_size()[0]) for im in fig.images]  # pixels: left, bottom, top
    titles = [t.get_window_extent(renderer) for t in fig.texts if t is not fig._suptitle]
    assert len(images) == len(titles) == 8
    for (_, _, image_top), title in zip(images, titles, strict=True):
        assert title.y0 >= image_top  # each title sits above its own image
    for (_, upper_bottom, _), lower_title in zip(images[:4], titles[4:], strict=True):
        assert lower_title.y1 < upper_bottom, (lower_title.y1, upper_bottom)
    # One mistake: the picture is one cell wide and its title wraps to stay inside it.
    explain = lambda rows, images: [np.zeros((im.height, im.width)) for im in images]  # noqa: E731
    plot_confident_mistakes(rows[:1], tmp_path / "one.png", explain=explain)
    single = figures.pop()
    box = single._suptitle.get_window_extent(single.canvas.get_renderer())
    assert "Grad-CAM" in single._suptitle.get_text() and "\n" in single._suptitle.get_text()
    assert box.x0 >= 0 and box.x1 <= single.bbox.width and box.y1 <= single.bbox.height
    assert box.y0 > max(t.get_window_extent().y1 for t in single.texts if t is not single._suptitle)
    metrics = [
        {"epoch": "0", "train/loss_epoch": "1.0", "train/acc": "0.5", "val/loss": "1.1", "val/acc": "0.4"}
    ]
    plot_learning_curves(metrics, tmp_path / "c.png", cached=True)
    plot_learning_curves(metrics, tmp_path / "d.png")
    titles = [f._suptitle.get_text() for f in figures[1:]]
    assert "train: cached backbone features" in titles[0] and "augmented" not in titles[0]
    assert "train: augmented batches" in titles[1]
