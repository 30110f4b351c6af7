"""Layer-wise learning-rate decay, the backbone's block partition, and the weight-decay
exemption of biases and normalisation parameters."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from helpers import build, trainer
from transfer_learning.errors import ConfigError
from transfer_learning.model.backbones import efficientnet_lite0, torchvision_backbone
from transfer_learning.model.strategies import LayerDecay


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "convnext_tiny", "densenet121", "inception_v3"])
def test_blocks_hold_every_backbone_parameter_once_in_depth_order(name):
    net = torchvision_backbone(name, num_classes=3, weights=None)
    blocks = net.blocks()
    ids = [id(p) for _, params in blocks for p in params]
    assert sorted(ids) == sorted(id(p) for p in net.backbone.parameters()) and len(ids) == len(set(ids))
    assert len(blocks) >= 6
    names = [n for n, _ in blocks]
    order = {
        "resnet18": ("conv1", "layer4.1"),
        "vit_b_16": ("(own)", "encoder.ln"),
        "convnext_tiny": ("features.0", "classifier"),
        "densenet121": ("features.conv0", "features.norm5"),
        "inception_v3": ("Conv2d_1a_3x3", "Mixed_7c"),
    }[name]
    assert (names[0], names[-1]) == order


def test_layer_decay_gives_each_block_decay_to_the_depth_times_the_head_rate():
    net = efficientnet_lite0(num_classes=3)
    strategy = LayerDecay(head_lr=1e-2, decay=0.5)
    strategy.prepare(net)
    groups = strategy.param_groups(net)
    assert [g["name"] for g in groups] == [f"block/{n}" for n, _ in net.blocks()] + ["head"]
    rates = [g["lr"] for g in groups]
    n = len(groups) - 1
    assert rates == pytest.approx([1e-2 * 0.5 ** (n - i) for i in range(n)] + [1e-2])
    assert rates[-2] == pytest.approx(5e-3) and rates[0] == pytest.approx(1e-2 * 0.5**11)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ConfigError, match=r"strategy\.decay=1\.5"):
        LayerDecay(decay=1.5)


class RecordGroups(Callback):
    """Each param group's learning rate, and whether the backbone trains, at every epoch start
    and every training batch."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.batches: list[dict[str, float]] = []
        self.modes: list[tuple[bool, bool]] = []

    def _rates(self, trainer) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(self._rates(trainer))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(self._rates(trainer))
        backbone = pl_module.net.backbone
        grads = all(p.requires_grad for p in backbone.parameters())
        self.modes.append((backbone.training and grads, all(m.training for m in backbone.modules())))


def test_layer_decay_keeps_its_ratios_through_the_schedule_and_trains_every_block(shapes_dir):
    module, datamodule = build(
        shapes_dir, "strategy=layer_decay", "strategy.decay=0.5", "scheduler=warmup_cosine"
    )
    before = {n: [p.detach().clone() for p in ps] for n, ps in module.net.blocks()}
    record = RecordGroups()
    trainer(callbacks=[record], max_epochs=3, limit_train_batches=2).fit(module, datamodule)
    assert len(record.epochs) == 3 and len(record.batches) == 6
    for rates in record.batches:  # the schedule scales every group alike: the ratios hold
        names = list(rates)
        head = rates["head"]
        for depth, name in enumerate(reversed(names[:-1]), start=1):
            assert rates[name] == pytest.approx(head * 0.5**depth), name
    assert len({round(r["head"], 12) for r in record.batches}) > 1  # and the schedule moved
    assert record.modes == [(True, True)] * 6  # every block trains, BatchNorm included, every batch
    changed = [
        n
        for n, ps in module.net.blocks()
        if any(not torch.equal(a, b) for a, b in zip(before[n], ps, strict=True))
    ]
    assert changed == [n for n, _ in module.net.blocks()]  # the bottom block too, if only a little


def test_finetune_keeps_exactly_two_groups_unless_norms_and_biases_are_exempted(shapes_dir):
    module, _ = build(shapes_dir, "strategy=finetune")
    groups = module.strategy.param_groups(module.net)
    assert [g["name"] for g in groups] == ["backbone", "head"]

    module, _ = build(
        shapes_dir,
        "strategy=finetune",
        "strategy.exempt_norm_bias=true",
        "optimizer.weight_decay=0.05",
        "scheduler=constant",
    )
    optimizer = module.configure_optimizers()
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {"backbone": 0.05, "backbone/no_decay": 0.0, "head": 0.05, "head/no_decay": 0.0}
    params = {g["name"]: g["params"] for g in optimizer.param_groups}
    assert all(p.ndim < 2 for p in params["backbone/no_decay"] + params["head/no_decay"])
    assert all(p.ndim >= 2 for p in params["backbone"] + params["head"])
    norm_weights = {id(m.weight) for m in module.net.backbone.modules() if isinstance(m, nn.BatchNorm2d)}
    assert norm_weights <= {id(p) for p in params["backbone/no_decay"]}
    counted = sum(len(v) for v in params.values())
    assert counted == len(list(module.net.parameters()))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["backbone/no_decay"] == lrs["backbone"] and lrs["head/no_decay"] == lrs["head"]
