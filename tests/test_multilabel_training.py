"""Multi-label training (task=multilabel): every strategy trains what it should with binary
cross-entropy; the metrics are scikit-learn's; thresholds travel in the checkpoint; DDP counts
every sample once; a killed run resumes exactly."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score
from test_resume_exact import pause_at, stop_at

from helpers import assert_same_weights, run_cli, trainer
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.run.checkpoints import safe_load
from transfer_learning.run.config import build, compose_config


def data_args(folder: Path, image_size: int = 64) -> list[str]:
    return [
        "data=csv",
        f"data.file={folder / 'labels.csv'}",
        "data.label_column=labels",
        "task=multilabel",
        f"input.image_size={image_size}",
        "data.batch_size=8",
        "data.num_workers=0",
    ]


def built(folder: Path, tmp_path: Path, *overrides: str):
    cfg = compose_config([*data_args(folder), f"paths.feature_cache_dir={tmp_path / 'cache'}", *overrides])
    datamodule, module = build(cfg)
    return module, datamodule


def predictions(module: TransferLearningModule, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    module.eval()
    with torch.no_grad():
        pairs = [(module.probabilities(module(x)), y) for x, y in loader]
    return torch.cat([p for p, _ in pairs]), torch.cat([y for _, y in pairs])


@pytest.mark.parametrize(
    "strategy",
    ["feature_extract", "finetune", pytest.param("lp_ft", marks=pytest.mark.slow), "gradual_unfreeze"],
)
def test_every_strategy_trains_a_multilabel_head_with_bce(multilabel_dir, tmp_path, strategy):
    L.seed_everything(0)
    module, datamodule = built(multilabel_dir, tmp_path, f"strategy={strategy}")
    assert module.task == "multilabel" and module.monitor == "val/map"
    assert module.criterion.multilabel
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    fit = trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=None)
    fit.fit(module, datamodule)
    after = module.net.state_dict()
    assert not torch.equal(before["head.weight"], after["head.weight"])
    backbone = [k for k in before if k.startswith("backbone.")]
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    if strategy == "feature_extract":
        assert changed == []  # weights and BatchNorm statistics stay pretrained
    elif strategy != "gradual_unfreeze":  # (its first epochs train the head only)
        assert changed
    assert module.thresholds is not None and module.thresholds.shape == (5,)
    metrics = fit.callback_metrics
    for name in ("val/map", "val/f1", "val/f1_micro", "val/exact_match", "val/map_best"):
        assert 0.0 <= float(metrics[name]) <= 1.0, name


def test_multilabel_metrics_are_scikit_learns(multilabel_dir, tmp_path):
    """val/map, F1 and exact match as logged equal scikit-learn's on the model's own outputs."""
    L.seed_everything(0)
    module, datamodule = built(multilabel_dir, tmp_path, "strategy=feature_extract")
    fit = trainer(max_epochs=3, limit_val_batches=None)
    fit.fit(module, datamodule)
    (logged,) = fit.validate(module, datamodule, verbose=False)
    datamodule.setup()
    probs, targets = predictions(module, datamodule.datasets["val"])
    truth = targets.numpy().astype(int)
    assert truth.shape == (len(datamodule.datasets["val"]), 5)
    assert logged["val/map"] == pytest.approx(
        average_precision_score(truth, probs.numpy(), average="macro"), abs=1e-5
    )
    called = (probs >= module.thresholds).numpy().astype(int)
    assert logged["val/f1"] == pytest.approx(
        f1_score(truth, called, average="macro", zero_division=0), abs=1e-5
    )
    assert logged["val/f1_micro"] == pytest.approx(f1_score(truth, called, average="micro"), abs=1e-5)
    assert logged["val/exact_match"] == pytest.approx(float((called == truth).all(1).mean()), abs=1e-5)
    assert 0.2 < logged["val/map"] < 1.0  # a real ranking, not a constant


def test_thresholds_and_task_travel_in_the_checkpoint(multilabel_dir, tmp_path):
    L.seed_everything(0)
    module, datamodule = built(multilabel_dir, tmp_path, "strategy=feature_extract")
    fit = trainer(max_epochs=2, limit_val_batches=None)
    fit.fit(module, datamodule)
    path = tmp_path / "multi.ckpt"
    fit.save_checkpoint(path)
    assert safe_load(path)["thresholds"] == pytest.approx(module.thresholds.tolist())
    loaded = TransferLearningModule.load_for_inference(path)
    assert loaded.task == "multilabel" and torch.equal(loaded.thresholds, module.thresholds)
    x = torch.randn(3, 3, 64, 64)
    probs = loaded.probabilities(loaded(x))
    assert probs.shape == (3, 5) and not torch.allclose(probs.sum(1), torch.ones(3))  # sigmoids
    decided = loaded.decide(probs)
    assert decided == [[c for c in range(5) if probs[i, c] >= loaded.thresholds[c]] for i in range(3)]


def test_weighted_loss_gives_the_multilabel_loss_its_pos_weight(multilabel_dir, tmp_path):
    module, datamodule = built(multilabel_dir, tmp_path, "data.balance=weighted_loss")
    expected = datamodule.loss_weights()
    assert expected is not None and torch.equal(module.train_criterion.weight, expected)
    logits, target = torch.zeros(2, 5), torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 1.0, 0, 0]])
    manual = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=expected)
    assert module.train_criterion(logits, target) == pytest.approx(float(manual))


@pytest.mark.slow
def test_multilabel_ddp_counts_every_sample_once(multilabel_dir, tmp_path):
    """Two processes; the best checkpoint evaluated on one device gives the summary's numbers."""
    args = data_args(multilabel_dir, image_size=32)
    result = run_cli(tmp_path, *args, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                     "trainer.max_epochs=2", "logger=csv", "worst_samples=0")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    datamodule, module = build(compose_config(args))
    single = trainer(limit_val_batches=None)
    (tested,) = single.test(module, datamodule, ckpt_path=summary["best checkpoint"], verbose=False)
    for key in ("test/map", "test/f1", "test/exact_match"):
        assert summary[key] == pytest.approx(tested[key], abs=1e-6), key


ARGS = ["input.image_size=32", "data.batch_size=8", "data.num_workers=2", "strategy=finetune", "logger=csv",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "worst_samples=0"]  # fmt: skip


@pytest.mark.slow
def test_a_killed_multilabel_run_resumes_to_the_same_weights(multilabel_dir, tmp_path):
    data = [
        a for a in data_args(multilabel_dir, 32) if not a.startswith(("input.", "data.batch", "data.num"))
    ]
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    done = run_cli(straight_dir, *data, *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "stopped"
    folder.mkdir()
    code, output = stop_at(folder, signal.SIGKILL, *data, *ARGS,
                           *pause_at("on_train_batch_start", folder, batch=2, epoch=1))  # fmt: skip
    assert code == -signal.SIGKILL, output[-3000:]
    last = folder / "run" / "checkpoints" / "last.ckpt"
    assert safe_load(last)["epoch"] == 0 and "thresholds" in safe_load(last)
    resumed = run_cli(folder, *data, *ARGS, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(folder / "run", straight_dir / "run")
    assert np.isfinite(safe_load(last)["thresholds"]).all()
