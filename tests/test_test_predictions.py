"""test_predictions.json (each test image's probabilities and target) is data a user may
receive: written and read back exactly, a crafted one refused naming its field; and the sweep's
paired comparison of two runs built on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transfer_learning.readers import UntrustedFileError
from transfer_learning.results.comparison import describe_lead, paired_lead
from transfer_learning.results.intervals import paired_bootstrap
from transfer_learning.results.point_metrics import accuracy
from transfer_learning.results.test_predictions import FILE, read_test_predictions, write_test_predictions

NAMES = ["circle", "square", "=cmd"]


def write(folder: Path, probs: torch.Tensor, targets: list, task: str = "multiclass") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    files = [f"img{i}.png" for i in range(len(targets))]
    thresholds = [0.5, 0.4, 0.6] if task == "multilabel" else None
    return write_test_predictions(folder / FILE, task, NAMES, thresholds, files, targets, probs)


def probabilities(n: int, seed: int, skill: float) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 3, (n,), generator=g)
    logits = torch.randn(n, 3, generator=g) + skill * torch.nn.functional.one_hot(targets, 3)
    return logits.softmax(1), targets.tolist()


def test_written_and_read_back_for_both_tasks(tmp_path):
    probs, targets = probabilities(20, 0, 2.0)
    saved = read_test_predictions(write(tmp_path / "a", probs, targets))
    assert saved.task == "multiclass" and saved.class_names == NAMES and saved.thresholds is None
    assert saved.targets.tolist() == targets and saved.files[3] == "img3.png"
    assert torch.allclose(saved.probs, probs.double(), atol=1e-6)
    multi = read_test_predictions(
        write(tmp_path / "b", probs, [(0, 2), (), (1,)] * 6 + [(0,), (1,)], "multilabel")
    )
    assert multi.multilabel and multi.thresholds == [0.5, 0.4, 0.6]
    assert multi.targets[0].tolist() == [1, 0, 1] and multi.targets[1].tolist() == [0, 0, 0]
    assert saved.logits is None  # a test split's file: probabilities only
    logits = torch.randn(20, 3) * 30  # a fold's file: the logits before the temperature too
    folder = tmp_path / "c"
    folder.mkdir()
    path = write_test_predictions(folder / FILE, "multiclass", NAMES, None, saved.files, targets, probs,
                                  logits)  # fmt: skip
    assert torch.allclose(read_test_predictions(path).logits, logits.double(), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"task": "regression"}, "'task'"),
        ({"class_names": [1, 2, 3]}, "'class_names'"),
        ({"probs": [[0.5, 0.5, 0.5]]}, "'probs'"),
        ({"probs": [[2.0, 0.0, 0.0]] * 4}, "'probs'"),
        ({"targets": [0, 1, 7, 0]}, "'targets'"),
        ({"targets": [True, 1, 0, 0]}, "'targets'"),
        ({"targets": [{"_target_": "os.system"}] * 4}, "'targets'"),
        ({"files": [["a"]] * 4}, "'files'"),
        ({"logits": [[1.0, 2.0]] * 4}, "'logits'"),
        ({"logits": [[1.0, 2.0, float("nan")]] * 4}, "'logits'"),
        ({"logits": [[1.0, 2.0, 3.0]] * 3}, "'logits'"),
        ({"logits": "os.system"}, "'logits'"),
    ],
)
def test_a_crafted_file_is_refused_naming_its_field(tmp_path, change, field):
    probs, targets = probabilities(4, 1, 2.0)
    path = write(tmp_path, probs, targets)
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, **change}))
    with pytest.raises(UntrustedFileError, match=field) as caught:
        read_test_predictions(path)
    assert str(path) in str(caught.value) and "run the job again" in str(caught.value)


def test_paired_lead_is_the_paired_bootstrap_of_accuracy(tmp_path):
    probs_a, targets = probabilities(60, 2, 3.0)
    g = torch.Generator().manual_seed(9)
    probs_b = (probs_a + 0.6 * torch.rand(60, 3, generator=g)).softmax(1)  # a noisier copy
    write(tmp_path / "a", probs_a, targets)
    write(tmp_path / "b", probs_b, targets)
    found = paired_lead(tmp_path / "a", tmp_path / "b", "acc")
    t = torch.tensor(targets)
    slow = paired_bootstrap(
        lambda i: accuracy(probs_a[i], t[i]), lambda i: accuracy(probs_b[i], t[i]), 60, 1000, 0
    )
    assert found["images"] == 60
    for key in ("difference", "low", "high", "p_better"):
        assert found[key] == pytest.approx(slow[key], abs=1e-9), key
    line = describe_lead(
        {"job": 0, "output_dir": tmp_path / "a"}, {"job": 1, "output_dir": tmp_path / "b"}, "test/acc"
    )
    assert line.startswith(f"lead of job 0 over job 1 on test/acc: {slow['difference']:+.4f}, 95 % [")
    inside = slow["low"] <= 0 <= slow["high"]
    assert ("inside the noise" in line) == inside and ("outside the noise" in line) == (not inside)


def test_a_lead_of_many_images_is_outside_the_noise_and_a_tie_inside(tmp_path):
    probs, targets = probabilities(200, 3, 4.0)
    wrong = torch.roll(probs, 1, dims=1)  # confidently wrong on every image
    mixed = torch.where(torch.arange(200)[:, None] < 100, probs, wrong)
    write(tmp_path / "good", probs, targets)
    write(tmp_path / "half", mixed, targets)
    write(tmp_path / "same", probs, targets)
    good, half, same = ({"job": n, "output_dir": tmp_path / n} for n in ("good", "half", "same"))
    assert "outside the noise:" not in describe_lead(good, half, "test/acc")  # (it goes on: no colon)
    assert describe_lead(good, half, "test/acc").endswith("outside the noise")
    assert "inside the noise" in describe_lead(good, same, "test/acc")
    assert describe_lead(half, good, "test/acc").endswith("outside the noise, in the runner-up's favour")


def test_runs_on_other_images_or_without_predictions_are_not_compared(tmp_path):
    probs, targets = probabilities(10, 4, 2.0)
    write(tmp_path / "a", probs, targets)
    write(tmp_path / "b", probs[:9], targets[:9])
    (tmp_path / "c").mkdir()
    a, b, c = ({"job": n, "output_dir": tmp_path / n} for n in "abc")
    assert describe_lead(a, b, "test/acc").endswith(
        "not compared, they were tested on different images or classes"
    )
    assert "not compared, no test predictions to compare" in describe_lead(a, c, "test/acc")
    assert describe_lead(a, a, "test/loss").endswith("not compared, loss has no per-image form")
