"""timm backbones: timm's own preprocessing, local weight files, the offline error."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from transfer_learning.errors import ConfigError, WeightsError
from transfer_learning.model.backbones import timm_backbone


def test_timm_backbone_takes_preprocessing_from_the_pretrained_config():
    net = timm_backbone("resnet10t", num_classes=4, weights=None)
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("resnet10t"))
    p = net.preprocessing
    assert (p.crop_size, p.interpolation, p.mean, p.std) == (176, "bicubic", cfg["mean"], cfg["std"])
    assert p.resize_size == int(176 / cfg["crop_pct"])
    assert net.head.in_features == 512 and net.head.out_features == 4
    assert net.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    vit = timm_backbone("vit_tiny_patch16_224", num_classes=4, weights=None).preprocessing
    assert vit.fixed_size and vit.crop_size == 224 and vit.mean == (0.5, 0.5, 0.5)


def test_timm_weights_from_a_local_safetensors_file(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model("resnet10t", num_classes=7).state_dict()  # another head size
    path = tmp_path / "resnet10t.safetensors"
    save_file(source, str(path))
    net = timm_backbone("resnet10t", num_classes=4, weights=str(path))
    weights = net.backbone.state_dict()
    assert not any(k.startswith("fc.") for k in weights)
    assert all(torch.equal(weights[k], source[k]) for k in weights)


def test_timm_pretrained_weights_offline_are_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as info:
        timm_backbone("resnet10t", num_classes=4, weights="pretrained")
    message = str(info.value)
    assert "resnet10t" in message and "Hugging Face cache" in message
    assert "model.weights=/path/to/file.safetensors" in message and "model.weights=null" in message


def test_timm_file_of_another_model_is_reported(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    with pytest.raises(WeightsError, match="does not fit model resnet10t"):
        timm_backbone("resnet10t", num_classes=4, weights=str(path))


def test_unknown_timm_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown timm model 'resnet10x'"):
        timm_backbone("resnet10x", num_classes=4, weights=None)


def test_timm_pretrained_weights_come_from_the_local_hugging_face_cache_offline(tmp_path):
    """The layout huggingface_hub writes: models--<org>--<name>/refs/main + snapshots/<rev>/."""
    revision = "0" * 40
    repo = tmp_path / "models--timm--resnet10t.c3_in1k"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    torch.manual_seed(4)
    source = timm.create_model("resnet10t").state_dict()
    save_file(source, str(repo / "snapshots" / revision / "model.safetensors"))
    net = timm_backbone("resnet10t", num_classes=4, weights="pretrained", cache_dir=str(tmp_path))
    assert torch.equal(net.backbone.conv1[0].weight, source["conv1.0.weight"])
    assert torch.equal(net.backbone.layer4[0].bn1.running_mean, source["layer4.0.bn1.running_mean"])


@pytest.mark.parametrize(("name", "width"), [("mobilenetv3_small_050", 1024), ("resnet18", 512)])
def test_the_head_takes_the_width_the_backbone_returns(name, width):
    """MobileNetV3's num_features (288) is not its output width: a pre-logits layer makes it 1024."""
    net = timm_backbone(name, num_classes=3, weights=None).eval()
    with torch.no_grad():
        features = net.forward_features(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, width) == (2, net.head.in_features)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 3)
