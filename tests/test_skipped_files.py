"""data.on_bad_file=skip: a file that breaks after the scan is left out together with its label,
in training loaders (worker processes included), evaluation, the worst-samples list and the
summary; no other image ever stands in for it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import build, run_cli
from transfer_learning.data.datasets import samples
from transfer_learning.data.demo import generate_shapes
from transfer_learning.data.skipping import collate_present, kept_positions, skipped_positions
from transfer_learning.results.analysis import predict_probabilities


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return generate_shapes(tmp_path / "shapes", images_per_class=12, image_size=40)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_broken_file_leaves_with_its_label_and_the_main_process_knows(data: Path, workers: int) -> None:
    module, datamodule = build(data, "strategy=finetune", "data.on_bad_file=skip")
    datamodule.setup()
    val = datamodule.datasets["val"]
    files, labels = samples(val)
    broken = [2, 5]
    for i in broken:
        Path(files[i]).write_bytes(b"not an image any more")
    loader = DataLoader(val, batch_size=3, num_workers=workers, collate_fn=collate_present)
    seen = torch.cat([y for _, y in loader]).tolist()
    kept = [i for i in range(len(files)) if i not in broken]
    assert seen == [labels[i] for i in kept]  # every other label in order, the broken ones gone
    assert skipped_positions(val) == broken and kept_positions(val) == kept  # marked in the workers
    probs, positions = predict_probabilities(module, val, batch_size=4, workers=workers)
    assert positions == kept and probs.shape == (len(kept), 5)
    assert datamodule.count_skipped() == {"val": 2}
    assert datamodule.left_out["unreadable during the run (val)"] == 2


def test_a_batch_of_nothing_but_broken_files_is_no_training_step(data: Path) -> None:
    module, _ = build(data, "strategy=finetune", "data.on_bad_file=skip")
    assert module.training_step(None, 0) is None
    module.validation_step(None, 0)  # nothing to count
    assert collate_present([None, None]) is None


@pytest.mark.slow
def test_a_run_that_meets_broken_files_counts_them_and_never_mislabels(tmp_path: Path) -> None:
    """No scan (data.verify_images=false), so the files break during the run: in the training
    loader, validation, testing and the worst-samples list."""
    root = generate_shapes(tmp_path / "shapes", images_per_class=10, image_size=48)
    broken = sorted((root / "star").glob("*.jpg"))[:4]
    for path in broken:
        path.write_text("this is a text file named .jpg\n")
    result = run_cli(tmp_path, "data=imagefolder", f"data.root={root}", "data.verify_images=false",
                     "data.on_bad_file=skip", "strategy=finetune", "input.image_size=48",
                     "data.batch_size=8", "trainer.max_epochs=1", "logger=csv")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    counted = {
        part.rsplit("(", 1)[-1].rstrip(")"): int(part.split(" ", 1)[0])
        for part in summary["files left out"].split(", ")
    }
    assert sum(counted.values()) == 4, summary["files left out"]  # each broken file once, by split
    assert set(counted) <= {"train", "val", "test"}
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Left out 4 file(s) that could not be read during the run" in log
    with open(tmp_path / "run" / "val_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and not {r["file"] for r in rows} & {str(p) for p in broken}
    for row in rows:  # the label of each listed file is its own folder's
        assert row["true"] == Path(row["file"]).parent.name
