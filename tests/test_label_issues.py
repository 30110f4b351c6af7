"""Label issues from out-of-fold probabilities (cv=K): confident learning (cleanlab) finds the
images whose label was flipped, ranks them by the probability of the given label, suggests the
right one; multi-label per (image, class); a real cv run writes label_issues.csv, the picture,
the report's section, the summary line and the W&B table, each agreeing with the out-of-fold
probabilities read another way."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from helpers import read_wandb_run, run_cli
from transfer_learning.results.label_issues import OutOfFold, find_label_issues

NAMES = ["circle", "cross", "square", "=cmd"]


def confident(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """True classes and out-of-fold probabilities of a good model (right with 0.7-0.95)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g) * 0.3 + 3.0 * torch.nn.functional.one_hot(truth, classes)
    return truth, logits.softmax(1).double()


def test_flipped_labels_are_found_ranked_and_the_true_class_suggested():
    truth, probs = confident(200, 4, 0)
    given = truth.clone()
    flipped = [3, 17, 42, 99, 150]
    for i in flipped:
        given[i] = (truth[i] + 1) % 4
    files = [f"img{i}.jpg" for i in range(200)]
    rows = find_label_issues(OutOfFold(files, NAMES, given, probs))
    # Confident learning counts an image toward a noise rate only where its probability of the
    # other class reaches that class's own mean: the flips the model is surest of (3 of 5 here),
    # and no clean image.
    assert {r["file"] for r in rows} == {files[i] for i in flipped if probs[i, truth[i]] >= 0.89}
    assert len(rows) == 3
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["score"] for r in rows] == sorted(r["score"] for r in rows)  # most likely wrong first
    for row in rows:
        i = files.index(row["file"])
        assert row["given"] == NAMES[int(given[i])] and row["suggested"] == NAMES[int(truth[i])]
        assert row["score"] == pytest.approx(float(probs[i, given[i]]), abs=1e-6)
    assert find_label_issues(OutOfFold(files, NAMES, truth, probs)) == []  # clean labels: none


def test_multilabel_issues_are_per_image_and_class():
    g = torch.Generator().manual_seed(1)
    truth = (torch.rand(150, 3, generator=g) < 0.4).long()
    probs = (0.08 + 0.84 * truth + 0.04 * torch.rand(150, 3, generator=g)).double()  # a good model
    given = truth.clone()
    flips = [(5, 0), (60, 2), (61, 1), (120, 2)]
    for i, c in flips:
        given[i, c] = 1 - given[i, c]
    files = [f"m{i}.jpg" for i in range(150)]
    rows = find_label_issues(OutOfFold(files, NAMES[:3], given, probs))
    found = {(files.index(r["file"]), NAMES.index(r["class"])) for r in rows}
    assert found <= set(flips) and len(found) >= 2, found  # no clean (image, class) listed
    for row in rows:
        i, c = files.index(row["file"]), NAMES.index(row["class"])
        as_given = {NAMES[k] for k in range(3) if given[i, k]}
        assert set(row["given"].split()) - {"(none)"} == as_given
        assert set(row["suggested"].split()) - {"(none)"} == as_given ^ {NAMES[c]}  # that class flipped
        want = float(probs[i, c]) if given[i, c] else 1 - float(probs[i, c])
        assert row["score"] == pytest.approx(want, abs=1e-6)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_cv_run_lists_its_label_issues_everywhere_a_user_looks(shapes_dir, tmp_path):
    tiny = ["input.image_size=48", "trainer.max_epochs=2", "worst_samples=0", "data.batch_size=16"]
    result = run_cli(tmp_path, f"data.root={shapes_dir}", "cv=2", "logger=wandb", *tiny,
                     env={"WANDB_MODE": "offline"})  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "run"
    rows = read_csv(run / "label_issues.csv")
    oof = {r["file"]: r for r in read_csv(run / "oof_predictions.csv")}
    assert rows and list(rows[0]) == ["rank", "file", "given", "suggested", "score"]
    for row in rows:  # the score is the out-of-fold probability of the label the image carries
        scored = oof[row["file"]]
        assert row["given"] == scored["label"] == Path(row["file"]).parent.name != row["suggested"]
        assert float(row["score"]) == pytest.approx(float(scored[f"prob_{row['given']}"]), abs=2e-6)
    assert [float(r["score"]) for r in rows] == sorted(float(r["score"]) for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    line = f"{len(rows)} likely ({run / 'label_issues.csv'})"
    assert summary["label issues"] == line and f"label issues             {line}" in result.stdout
    report = (run / "report.md").read_text()
    assert "![Likely label errors](label_issues.png)" in report and (run / "label_issues.png").is_file()
    assert Path(rows[0]["file"]).name in report
    # W&B: the folds and one cv run in one group; the cv run holds the table and the means
    (cv_wandb,) = (run / "wandb").glob("offline-run-*")
    logged = read_wandb_run(cv_wandb)
    fold = read_wandb_run(next((run / "folds" / "fold0" / "wandb").glob("offline-run-*")))
    assert logged["run"]["run_group"] == fold["run"]["run_group"] == f"cv-{run.name}"
    assert logged["run"]["display_name"].endswith(" cv")
    table = logged["tables"]["label_issues"]
    assert len(table["data"]) == min(len(rows), 32)
    files = table["columns"].index("file")
    assert [r[files] for r in table["data"]] == [r["file"] for r in rows[:32]]
    assert table["data"][0][table["columns"].index("image")]["_type"] == "image-file"
    (values,) = [row for row in logged["history"] if "cv/test/acc_mean" in row]
    assert values["cv/test/acc_mean"] == pytest.approx(summary["cv"]["test/acc"]["mean"])
    assert values["cv/test/acc_std"] == pytest.approx(summary["cv"]["test/acc"]["std"])
    assert values["cv/label_issues"] == len(rows)
