"""Inception-v3 trains with its auxiliary loss and evaluates with the main head alone."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from helpers import build, trainer


@pytest.mark.slow
def test_inception_trains_a_step_with_the_auxiliary_loss_and_evaluates_without_it(shapes_dir):
    torch.manual_seed(0)
    module, datamodule = build(
        shapes_dir,
        "strategy=finetune",
        "model=inception_v3",
        "model.weights=null",
        "model.aux_loss_weight=0.4",
        "scheduler=constant",
        image_size=299,
        batch_size=2,
    )
    net = module.net
    (aux_head,) = net.aux_heads
    assert isinstance(net.backbone.AuxLogits, nn.Identity)  # the backbone only hands over features
    assert aux_head.fc.out_features == 5
    datamodule.setup()
    x, y = next(iter(datamodule.train_dataloader()))

    # The training loss is the main cross-entropy plus 0.4 times the auxiliary one.
    net.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() outside a Trainer
        torch.manual_seed(1)
        loss = module.training_step((x, y), 0)
    torch.manual_seed(1)  # the same dropout masks
    logits, aux = net.forward_with_aux(x)
    assert len(aux) == 1 and aux[0].shape == (2, 5)
    assert loss.item() == pytest.approx((cross_entropy(logits, y) + 0.4 * cross_entropy(aux[0], y)).item())
    assert loss.item() != pytest.approx(cross_entropy(logits, y).item())

    aux_before = copy.deepcopy(aux_head.state_dict())
    trainer(max_steps=1).fit(module, datamodule)
    changed = [k for k, v in aux_head.state_dict().items() if not torch.equal(aux_before[k], v)]
    assert "fc.weight" in changed and "conv0.conv.weight" in changed
    head_group = module.trainer.optimizers[0].param_groups[1]
    assert head_group["name"] == "head"
    assert {id(p) for p in aux_head.parameters()} <= {id(p) for p in head_group["params"]}

    net.eval()
    with torch.no_grad():
        logits, aux = net.forward_with_aux(x)
        assert aux == [] and logits.shape == (2, 5)
        assert torch.equal(module(x), logits)


def test_auxiliary_classifier_raises_the_minimum_input_size_until_dropped():
    from transfer_learning.errors import ConfigError
    from transfer_learning.model.backbones import torchvision_backbone
    from transfer_learning.model.strategies import FeatureExtraction
    from transfer_learning.preprocessing import resolve_input_size

    net = torchvision_backbone("inception_v3", num_classes=3, weights=None, aux_loss_weight=0.4)
    assert net.preprocessing.min_size == 299  # its 5x5 conv needs a 17x17 Mixed_6e map
    with pytest.raises(ConfigError, match=r"model\.aux_loss_weight=0 lowers it to 75"):
        resolve_input_size(net.preprocessing, 160)
    FeatureExtraction().prepare(net)  # a frozen backbone in eval mode drops the aux head
    assert net.preprocessing.min_size == 75
    assert resolve_input_size(net.preprocessing, 160).crop_size == 160
