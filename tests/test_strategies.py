"""What each strategy trains, freezes and keeps in eval mode, proven by real Trainer runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from helpers import build, run_cli, trainer
from transfer_learning.errors import ConfigError
from transfer_learning.model.strategies import FeatureExtraction, FineTuning


class RecordModes(Callback):
    """Records, at every training batch, whether the backbone and its BatchNorm layers train."""

    def __init__(self) -> None:
        self.backbone_training: list[bool] = []
        self.norms_training: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        backbone = pl_module.net.backbone
        self.backbone_training.append(backbone.training)
        norms = [m.training for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        self.norms_training.append(any(norms))


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(module.state_dict())


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("cached", [True, False])
def test_feature_extraction_trains_only_the_head_and_keeps_the_backbone_bit_identical(shapes_dir, cached):
    module, datamodule = build(
        shapes_dir,
        "strategy=feature_extract",
        f"strategy.cache_features={cached}",
        "strategy.head_lr=0.02",
        "scheduler=constant",
    )
    backbone_before, head_before = _snapshot(module.net.backbone), _snapshot(module.net.head)
    modes = RecordModes()
    trainer(callbacks=[modes], max_steps=4).fit(module, datamodule)

    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"net.head.weight", "net.head.bias"}
    assert _changed(backbone_before, module.net.backbone.state_dict()) == set()  # buffers included
    assert any("running_mean" in k for k in backbone_before)
    assert _changed(head_before, module.net.head.state_dict()) == {"weight", "bias"}
    assert modes.backbone_training == [False] * 4 and not any(modes.norms_training)

    (group,) = module.trainer.optimizers[0].param_groups
    assert group["name"] == "head" and group["lr"] == pytest.approx(0.02)
    assert {id(p) for p in group["params"]} == {id(p) for p in module.net.head.parameters()}


def test_naive_requires_grad_freezing_would_drift_batchnorm_statistics(shapes_dir):
    """Why the backbone stays in eval mode: frozen parameters alone still update running stats."""
    module, datamodule = build(
        shapes_dir, "strategy=feature_extract", "strategy.cache_features=false", "scheduler=constant"
    )
    module.net.unfreeze_backbone()
    module.net.backbone.requires_grad_(False)  # requires_grad=False only, the usual recipe
    module.net.train()
    before = _snapshot(module.net.backbone)
    trainer(max_steps=2).fit(module, datamodule)
    drifted = _changed(before, module.net.backbone.state_dict())
    assert drifted and all("running_" in k or "num_batches" in k for k in drifted)


def test_finetuning_has_two_param_groups_partitioning_every_parameter(shapes_dir):
    module, datamodule = build(shapes_dir, "strategy=finetune", "scheduler=constant")
    backbone_before, head_before = _snapshot(module.net.backbone), _snapshot(module.net.head)
    modes = RecordModes()
    trainer(callbacks=[modes], max_steps=3).fit(module, datamodule)

    backbone_group, head_group = module.trainer.optimizers[0].param_groups
    assert (backbone_group["name"], backbone_group["lr"]) == ("backbone", pytest.approx(1e-4))
    assert (head_group["name"], head_group["lr"]) == ("head", pytest.approx(1e-3))
    backbone_ids = {id(p) for p in backbone_group["params"]}
    head_ids = {id(p) for p in head_group["params"]}
    assert backbone_ids.isdisjoint(head_ids)
    assert backbone_ids == {id(p) for p in module.net.backbone.parameters()}
    assert head_ids == {id(p) for p in module.net.head.parameters()}
    assert len(backbone_ids) + len(head_ids) == len(list(module.parameters()))
    assert all(p.requires_grad for p in module.parameters())

    changed = _changed(backbone_before, module.net.backbone.state_dict())
    assert "conv_stem.weight" in changed and "blocks.6.0.conv_pwl.weight" in changed
    assert "bn1.running_mean" in changed  # BatchNorm trains normally in fine-tuning
    assert _changed(head_before, module.net.head.state_dict()) == {"weight", "bias"}
    assert all(modes.backbone_training) and all(modes.norms_training)


def test_finetuning_with_frozen_bn_stats_trains_weights_but_keeps_statistics(shapes_dir):
    # 64 px: at 32 px the pretrained statistics saturate every ReLU6 and no gradient reaches the backbone.
    module, datamodule = build(
        shapes_dir, "strategy=finetune", "strategy.freeze_bn_stats=true", "scheduler=constant", image_size=64
    )
    before = _snapshot(module.net.backbone)
    modes = RecordModes()
    trainer(callbacks=[modes], max_steps=3).fit(module, datamodule)
    changed = _changed(before, module.net.backbone.state_dict())
    assert "conv_stem.weight" in changed and "bn1.weight" in changed
    assert not any("running_" in k or "num_batches" in k for k in changed)
    assert all(modes.backbone_training) and not any(modes.norms_training)


class RecordLearningRates(Callback):
    def __init__(self) -> None:
        self.lrs: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        backbone_group, head_group = trainer.optimizers[0].param_groups
        self.lrs.append((backbone_group["lr"], head_group["lr"]))


def test_scheduler_warms_up_decays_and_keeps_the_backbone_to_head_ratio(shapes_dir):
    module, datamodule = build(
        shapes_dir, "strategy=finetune", "scheduler=warmup_cosine", "scheduler.warmup_fraction=0.4"
    )
    record = RecordLearningRates()
    trainer(callbacks=[record], max_steps=5).fit(module, datamodule)
    backbone_group, head_group = module.trainer.optimizers[0].param_groups
    assert backbone_group["initial_lr"] == pytest.approx(1e-4)
    assert head_group["initial_lr"] == pytest.approx(1e-3)
    heads = [head for _, head in record.lrs]
    # 5 steps, 2 of warm-up (1/2, 1), then a cosine from the peak towards 0 at step 5.
    assert heads == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3 * 0.75, 1e-3 * 0.25])
    assert all(b == pytest.approx(0.1 * h) for b, h in record.lrs)


def test_any_torch_scheduler_class_with_its_own_arguments_and_interval(shapes_dir):
    """scheduler=step is torch's StepLR, called with the optimizer alone and stepped per epoch."""
    module, datamodule = build(
        shapes_dir, "strategy=finetune", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5"
    )
    record = RecordLearningRates()
    fit = trainer(callbacks=[record], max_epochs=3, limit_train_batches=2)
    fit.fit(module, datamodule)
    (config,) = fit.lr_scheduler_configs
    assert type(config.scheduler).__name__ == "StepLR" and config.interval == "epoch"
    # Constant within an epoch, halved between epochs, the same in both groups.
    assert [h for _, h in record.lrs] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    assert all(b == pytest.approx(0.1 * h) for b, h in record.lrs)


def test_plateau_scheduler_gets_its_monitor_and_constant_rates_without_a_scheduler(shapes_dir):
    module, datamodule = build(shapes_dir, "strategy=finetune", "scheduler=plateau")
    fit = trainer(max_epochs=1, limit_train_batches=1)
    fit.fit(module, datamodule)
    (config,) = fit.lr_scheduler_configs
    assert type(config.scheduler).__name__ == "ReduceLROnPlateau" and config.monitor == "val/loss"

    module, datamodule = build(shapes_dir, "strategy=finetune", "scheduler=constant")
    record = RecordLearningRates()
    fit = trainer(callbacks=[record], max_steps=3)
    fit.fit(module, datamodule)
    assert fit.lr_scheduler_configs == [] and record.lrs == [(1e-4, 1e-3)] * 3


@pytest.mark.parametrize(
    ("strategy", "kwargs", "setting"),
    [
        (FeatureExtraction, {"head_lr": 0}, "strategy.head_lr=0"),
        (FineTuning, {"backbone_lr": -1e-4}, "strategy.backbone_lr=-0.0001"),
    ],
)
def test_non_positive_learning_rates_are_refused(strategy, kwargs, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        strategy(**kwargs)


def test_resuming_feature_extraction_keeps_the_backbone_frozen_and_the_groups(tmp_path, shapes_dir):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, datamodule = build(shapes_dir, "strategy=feature_extract", "scheduler=constant")
    pretrained = _snapshot(module.net.backbone)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[saver], enable_checkpointing=True, max_epochs=1).fit(module, datamodule)
    head_after_one_epoch = _snapshot(module.net.head)

    resumed, datamodule = build(shapes_dir, "strategy=feature_extract", "scheduler=constant")
    modes = RecordModes()
    second = trainer(callbacks=[modes], max_epochs=2)
    second.fit(resumed, datamodule, ckpt_path=str(tmp_path / "last.ckpt"))
    assert second.current_epoch == 2 and len(modes.backbone_training) > 0
    assert _changed(pretrained, resumed.net.backbone.state_dict()) == set()
    assert _changed(head_after_one_epoch, resumed.net.head.state_dict()) == {"weight", "bias"}
    assert modes.backbone_training == [False] * len(modes.backbone_training)
    (group,) = second.optimizers[0].param_groups
    assert group["name"] == "head" and group["lr"] == pytest.approx(0.1)  # conf/strategy/feature_extract.yaml


# -- the best-checkpoint monitor follows the task ---------------------------------------------


@pytest.mark.parametrize(("monitor", "best"), [("val/acc", "val/acc_best"), ("val/map", "val/map_best")])
def test_monitor_auto_follows_the_task_and_an_explicit_metric_stays(tmp_path, monitor, best):
    from transfer_learning.pipelines.train import resolve_monitor
    from transfer_learning.run.config import compose_config
    from transfer_learning.run.sweeps import optimized_metric

    cfg = compose_config(["callbacks=early_stopping"], output_dir=tmp_path)
    assert cfg.callbacks.model_checkpoint.monitor == "auto" and cfg.optimized_metric == "auto"
    assert optimized_metric(cfg, {best: 0.5}) == best  # a job's metric before the run resolves it
    resolve_monitor(cfg, monitor)
    assert cfg.callbacks.model_checkpoint.monitor == monitor
    assert cfg.callbacks.early_stopping.monitor == monitor
    assert cfg.callbacks.last_checkpoint.monitor is None  # monitors nothing, as configured
    assert cfg.optimized_metric == best

    explicit = compose_config(
        ["callbacks=early_stopping", "callbacks.model_checkpoint.monitor=val/loss",
         "callbacks.model_checkpoint.mode=min", "callbacks.early_stopping.monitor=val/f1",
         "optimized_metric=val/f1"],
        output_dir=tmp_path,
    )  # fmt: skip
    resolve_monitor(explicit, monitor)
    assert explicit.callbacks.model_checkpoint.monitor == "val/loss"
    assert explicit.callbacks.early_stopping.monitor == "val/f1"
    assert explicit.optimized_metric == "val/f1" and optimized_metric(explicit, {}) == "val/f1"


def test_the_sweep_table_sorts_an_auto_sweep_by_what_its_jobs_resolved(tmp_path):
    from omegaconf import OmegaConf

    from transfer_learning.results.sweep_table import sweep_metric, sweep_rows

    records = [
        {"job": n, "overrides": [f"lr={n}"], "status": "ok", "optimized_metric": "val/map_best",
         "metrics": {"val/map_best": v, "test/map": v / 2}, "output_dir": f"/x/{n}"}
        for n, v in enumerate([0.5, 0.9])
    ]  # fmt: skip
    metric = sweep_metric(OmegaConf.create({"optimized_metric": "auto"}), records)
    assert metric == "val/map_best"
    assert sweep_metric(OmegaConf.create({"optimized_metric": "val/loss"}), records) == "val/loss"
    rows = sweep_rows(records, metric, "max")
    assert [r["job"] for r in rows] == [1, 0] and rows[0]["best"] == "*" and rows[0]["test/map"] == 0.45


@pytest.mark.slow
def test_a_multilabel_run_keeps_its_best_checkpoint_by_val_map(multilabel_dir, tmp_path):
    result = run_cli(
        tmp_path, "data=csv", f"data.file={multilabel_dir / 'labels.csv'}", "data.label_column=labels",
        "task=multilabel", "input.image_size=32", "data.batch_size=16", "trainer.max_epochs=2", "logger=csv",
        f"paths.feature_cache_dir={tmp_path / 'cache'}", "callbacks=early_stopping",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["best val/map"] <= 1.0
    saved = torch.load(summary["best checkpoint"], map_location="cpu", weights_only=True)
    states = saved["callbacks"]
    (best,) = [k for k in states if k.startswith("ModelCheckpoint") and "'monitor': None" not in k]
    (stopping,) = [k for k in states if k.startswith("EarlyStopping")]
    assert "'monitor': 'val/map'" in best and "'monitor': 'val/map'" in stopping, list(states)
    assert float(states[best]["best_model_score"]) == pytest.approx(summary["best val/map"], abs=1e-4)
