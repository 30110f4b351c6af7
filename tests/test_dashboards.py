"""What a run leaves for people to look at, read back from the files: the offline W&B run (with
wandb's own reader), the per-class metrics, the worst validation images, the run facts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from helpers import build, read_wandb_run, train_cli, trainer
from transfer_learning.results.analysis import per_class_metrics, run_facts, worst_samples
from transfer_learning.results.predict import Classifier
from transfer_learning.run.config import build as build_from_config
from transfer_learning.run.config import compose_config


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_the_offline_wandb_run_holds_config_history_confusion_matrix_and_predictions(tmp_path, shapes_dir):
    data = ["data=imagefolder", f"data.root={shapes_dir}", "input.image_size=48", "data.num_workers=0",
            "data.batch_size=8"]  # fmt: skip
    result = train_cli(
        tmp_path, "strategy=finetune", *data, "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        "tags=[mine]", "worst_samples=6", "logger.wandb.checkpoint_artifact=true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_folder,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    summary = json.loads((run_folder / "summary.json").read_text())
    (wandb_dir,) = (run_folder / "wandb").glob("offline-run-*")
    assert f"upload with `wandb sync {wandb_dir}`" in result.stdout
    run = read_wandb_run(wandb_dir)

    # The resolved config, tags (yours + strategy + model) and the run facts.
    assert {"mine", "finetune", "efficientnet_lite0"} <= set(run["run"]["tags"])
    config = run["config"]
    assert config["strategy"]["_target_"] == "transfer_learning.model.strategies.FineTuning"
    assert config["data"]["root"] == str(shapes_dir) and config["trainer"]["max_epochs"] == 2
    module, _ = build(shapes_dir, "strategy=finetune")
    total = sum(p.numel() for p in module.net.parameters())
    facts = config["run"]
    assert facts["params/total"] == total and facts["params/trainable"] == total
    assert facts["params/frozen"] == 0
    assert facts["batch/effective"] == facts["batch/per_device"] == 8 and facts["devices"] == 1

    # Metric history: train, val and test metrics, and each param group's learning rate per step.
    keys = set().union(*run["history"])
    assert {
        "train/loss_step",
        "train/loss_epoch",
        "train/acc",
        "val/acc",
        "val/loss",
        "val/f1",
        "test/acc",
        "test/f1",
    } <= keys
    rates = [
        (row["lr-AdamW/backbone"], row["lr-AdamW/head"]) for row in run["history"] if "lr-AdamW/head" in row
    ]
    assert len(rates) >= 2 and len({head for _, head in rates}) > 1  # the schedule moved
    assert all(head == pytest.approx(10 * backbone) for backbone, head in rates)  # 1e-3 vs 1e-4
    assert [row["test/acc"] for row in run["history"] if "test/acc" in row] == [
        pytest.approx(summary["test/acc"])
    ]

    # The report's pictures (report.md beside the checkpoints) are W&B images too.
    for picture in ("report/learning_curves", "report/learning_rates", "test/confusion_matrix"):
        (row,) = [r for r in run["history"] if f"{picture}._type" in r]
        assert row[f"{picture}._type"] == "images/separated" and row[f"{picture}.format"] == "png"
        assert row[f"{picture}.width"] >= 600, picture
    assert (run_folder / "report.md").is_file() and summary["report"] == str(run_folder / "report.md")

    # The confusion matrix: W&B's interactive one holds the counts of confusion_matrix.csv.
    assert "_wandb.visualize.test/confusion_matrix_plot" in config
    table = run["tables"]["test/confusion_matrix_plot_table"]
    corner = "true \\ predicted"
    matrix_rows = read_csv(run_folder / "confusion_matrix.csv")
    counts = {(r[corner], name): int(r[name]) for r in matrix_rows for name in r if name != corner}
    logged = {(actual, predicted): n for actual, predicted, n in table["data"]}
    assert logged == counts and sum(counts.values()) == int(summary["images train/val/test"].split("/")[2])

    # Per-class metrics: the same numbers in W&B and in the CSV; their macro F1 is test/f1.
    per_class = run["tables"]["test/per_class"]
    assert per_class["columns"] == ["class", "precision", "recall", "f1", "support"]
    rows = read_csv(run_folder / "per_class_metrics.csv")
    assert [[r[c] for c in per_class["columns"]] for r in rows] == [
        [str(v) for v in r] for r in per_class["data"]
    ]
    assert sum(float(r["f1"]) for r in rows) / len(rows) == pytest.approx(summary["test/f1"], abs=1e-6)

    # The worst validation images, worst first, each with its picture; checked against the
    # checkpoint's own predictions on every validation file.
    predictions = run["tables"]["val/worst_predictions"]
    assert predictions["columns"] == ["image", "file", "true", "predicted", "confidence", "p_true", "correct"]
    assert len(predictions["data"]) == 6
    for image, *_ in predictions["data"]:
        assert image["_type"] == "image-file" and run["files"][image["path"]].is_file()
    datamodule, _ = build_from_config(compose_config([*data, "strategy=finetune"]))
    datamodule.setup()
    files, labels = datamodule.split_files["val"]
    classifier = Classifier.from_checkpoint(summary["best checkpoint"])
    p_true = [
        p.probabilities[classifier.class_names[y]]
        for p, y in zip(classifier.predict(files), labels, strict=True)
    ]
    expected = sorted(zip(p_true, files, strict=True))[:6]
    assert [row[1] for row in predictions["data"]] == [f for _, f in expected]
    assert [row[5] for row in predictions["data"]] == pytest.approx([p for p, _ in expected], abs=1e-4)
    assert [r["file"] for r in read_csv(run_folder / "val_predictions.csv")] == [f for _, f in expected]

    # The best checkpoint as a model artifact.
    (artifact,) = [a for a in run["artifacts"] if a.get("type") == "model"]
    assert "best" in artifact["aliases"]
    assert Path(summary["best checkpoint"]).name in json.dumps(artifact)


def test_per_class_metrics_match_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=generator)
    predicted = torch.where(torch.rand(200, generator=generator) < 0.6, labels, torch.randint(0, 4, (200,)))
    predicted[predicted == 3] = 2  # class 3 is never predicted: precision 0, not NaN
    matrix = torch.zeros(4, 4, dtype=torch.long)
    for t, p in zip(labels.tolist(), predicted.tolist(), strict=True):
        matrix[t, p] += 1
    rows = per_class_metrics(matrix, ["a", "b", "c", "d"])
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=[0, 1, 2, 3], zero_division=0
    )
    assert [r["precision"] for r in rows] == pytest.approx(precision.tolist())
    assert [r["recall"] for r in rows] == pytest.approx(recall.tolist())
    assert [r["f1"] for r in rows] == pytest.approx(f1.tolist())
    assert [r["support"] for r in rows] == support.tolist()
    assert rows[3]["precision"] == 0.0


def test_worst_samples_put_confident_mistakes_first_and_stop_at_the_limit():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.05, 0.95]])
    rows = worst_samples(["a", "b", "c", "d"], [0, 0, 1, 1], probs, ["x", "y"], limit=3)
    assert [r["file"] for r in rows] == ["b", "c", "a"]
    assert rows[0] == {"file": "b", "true": "x", "predicted": "y", "confidence": pytest.approx(0.8),
                       "p_true": pytest.approx(0.2), "correct": False}  # fmt: skip
    assert worst_samples(["a"], [0], probs[:1], ["x", "y"], limit=0) == []


def test_run_facts_count_what_the_strategy_trains(shapes_dir):
    module, datamodule = build(shapes_dir, batch_size=8)  # feature extraction: the head trains
    head = sum(p.numel() for p in module.net.head.parameters())
    total = sum(p.numel() for p in module.net.parameters())
    facts = run_facts(module, datamodule, trainer(accumulate_grad_batches=3))
    assert facts["params/trainable"] == head == 5 * 1280 + 5
    assert facts["params/frozen"] == total - head
    assert facts["batch/per_device"] == 8 and facts["batch/effective"] == 24
