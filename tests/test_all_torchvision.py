"""Every classifier in torchvision.models is a backbone: built on the meta device, so the whole
sweep checks shapes and parameter ownership in seconds without allocating weights."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from transfer_learning.model.backbones import torchvision_backbone, torchvision_names
from transfer_learning.model.network import Network
from transfer_learning.model.strategies import FeatureExtraction, FineTuning
from transfer_learning.results.explain import target_layer

NUM_CLASSES = 3
# One member of each family (how its classifier is laid out) runs in `make test-fast`; the rest
# of the zoo is marked slow and runs in the whole suite.
FAMILY_MEMBERS = {
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t",
    "swin_v2_t", "vgg11_bn", "vit_b_16", "wide_resnet50_2",
}  # fmt: skip


def zoo() -> list:
    slow = pytest.mark.slow
    return [pytest.param(n, marks=() if n in FAMILY_MEMBERS else slow) for n in torchvision_names()]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """For builders that compute with tensors (RegNet): only parameters and buffers go to meta."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(module, name, param):
        register_parameter(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    def buffer(module, name, tensor, persistent=True):
        register_buffer(module, name, tensor.to("meta") if tensor is not None else None, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]


def build_on_meta(name: str) -> Network:
    try:
        with torch.device("meta"):
            return torchvision_backbone(name, NUM_CLASSES, weights=None)
    except NotImplementedError:
        with parameters_on_meta():
            return torchvision_backbone(name, NUM_CLASSES, weights=None)


def test_the_sweep_covers_the_whole_zoo():
    assert len(torchvision_names()) >= 80
    assert set(torchvision_names()) >= FAMILY_MEMBERS
    family = re.compile(r"[a-z]+")  # resnet, vgg, vit, swin, regnet, ...
    assert {family.match(n)[0] for n in torchvision_names()} == {family.match(n)[0] for n in FAMILY_MEMBERS}
    assert {"alexnet", "squeezenet1_0", "maxvit_t", "swin_v2_b", "vit_h_14", "regnet_y_128gf"} <= set(
        torchvision_names()
    )


@pytest.mark.parametrize("name", zoo())
def test_every_torchvision_classifier_splits_into_body_and_head(name):
    net = build_on_meta(name)
    assert all(p.is_meta for p in net.parameters())
    assert isinstance(net.head, nn.Linear) and net.head.out_features == NUM_CLASSES
    size = net.preprocessing.crop_size
    x = torch.empty(2, 3, size, size, device="meta")

    net.eval()
    features = net.forward_features(x)
    assert features.shape == (2, net.head.in_features)
    assert net(x).shape == (2, NUM_CLASSES)

    # Grad-CAM's layer: a spatial map [B, C, H, W] (Swin: [B, H, W, C]), or ViT's tokens.
    target = target_layer(net.backbone, size)
    seen: list[torch.Size] = []
    hook = target.layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    net(x)
    hook.remove()
    if target.prefix_tokens is not None:
        assert len(seen[-1]) == 3 and round((seen[-1][1] - target.prefix_tokens) ** 0.5) ** 2 == (
            seen[-1][1] - target.prefix_tokens
        )
    else:
        assert len(seen[-1]) == 4, (name, seen[-1])
        channels = seen[-1][3] if target.channels_last else seen[-1][1]
        assert channels > 3 and min(seen[-1][1:3] if target.channels_last else seen[-1][2:]) >= 1, seen[-1]

    # Fine-tuning: two groups that partition every parameter, none missing, none twice.
    backbone_group, head_group = FineTuning().param_groups(net)
    body_ids = [id(p) for p in backbone_group["params"]]
    head_ids = [id(p) for p in head_group["params"]]
    all_ids = [id(p) for p in net.parameters()]
    assert len(set(body_ids + head_ids)) == len(body_ids) + len(head_ids) == len(all_ids)
    assert set(body_ids + head_ids) == set(all_ids)
    assert set(head_ids) == {id(p) for p in net.head.parameters()} | {
        id(p) for p in net.aux_heads.parameters()
    }

    # Feature extraction: only the head trains.
    FeatureExtraction().prepare(net)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in net.head.parameters()}
    net.train()
    assert not net.backbone.training and net.head.training


@pytest.mark.parametrize(("name", "aux_count"), [("inception_v3", 1), ("googlenet", 2)])
def test_auxiliary_classifiers_are_resized_and_only_used_in_training(name, aux_count):
    net = build_on_meta(name)
    assert len(net.aux_heads) == aux_count
    size = net.preprocessing.crop_size
    x = torch.empty(2, 3, size, size, device="meta")
    logits, aux = net.train().forward_with_aux(x)
    assert logits.shape == (2, NUM_CLASSES) and [a.shape for a in aux] == [(2, NUM_CLASSES)] * aux_count
    logits, aux = net.eval().forward_with_aux(x)
    assert logits.shape == (2, NUM_CLASSES) and aux == []


@pytest.mark.parametrize("name", ["inception_v3", "googlenet"])
def test_zero_aux_loss_weight_drops_the_auxiliary_classifiers(name):
    with torch.device("meta"):
        net = torchvision_backbone(name, NUM_CLASSES, weights=None, aux_loss_weight=0)
    assert len(net.aux_heads) == 0
    assert net.backbone.AuxLogits is None if name == "inception_v3" else net.backbone.aux1 is None
    size = net.preprocessing.crop_size
    _, aux = net.train().forward_with_aux(torch.empty(2, 3, size, size, device="meta"))
    assert aux == []
