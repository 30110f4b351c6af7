"""The backbone/head split, the bundled EfficientNet-Lite0 weights and the torchvision weights paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision.models import ResNet18_Weights, get_model

from transfer_learning.data.transforms import build_transforms
from transfer_learning.errors import ConfigError, WeightsError
from transfer_learning.model.backbones import LITE0_PREPROCESSING, efficientnet_lite0, torchvision_backbone
from transfer_learning.model.backbones.lite0 import bundled_lite0_file, map_lite0_state_dict
from transfer_learning.model.backbones.torchvision_models import (
    resolve_torchvision_weights,
    torchvision_cache_file,
)
from transfer_learning.model.network import Network
from transfer_learning.preprocessing import resolve_input_size, size_hints_off

IMAGENET_CLASSES = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


@pytest.fixture(scope="module")
def lite0_source() -> dict[str, torch.Tensor]:
    return torch.load(bundled_lite0_file(), map_location="cpu", weights_only=True)


def test_bundled_lite0_weights_map_by_name_onto_every_timm_tensor(lite0_source):
    model = timm.create_model("efficientnet_lite0", pretrained=False, bn_eps=1e-3)
    mapped = map_lite0_state_dict(lite0_source, model)
    target = model.state_dict()
    assert len(lite0_source) == len(mapped) == len(target) == 296
    assert set(mapped) == set(target)
    # The name mapping agrees with the file's order, tensor for tensor.
    for (src_key, src), (dst_key, dst) in zip(lite0_source.items(), target.items(), strict=True):
        assert mapped[dst_key] is src, (src_key, dst_key)
        assert src.shape == dst.shape


def test_lite0_backbone_uses_tensorflow_batchnorm_eps_and_pretrained_tensors(lite0_source):
    net = efficientnet_lite0(num_classes=4)
    norms = [m for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == pytest.approx(1e-3) for m in norms)
    assert torch.equal(net.backbone.conv_stem.weight, lite0_source["_conv_stem.weight"])
    assert torch.equal(net.backbone.bn2.running_var, lite0_source["_bn1.running_var"])
    assert isinstance(net.backbone.classifier, nn.Identity)
    assert isinstance(net.head, nn.Linear)
    assert (net.head.in_features, net.head.out_features) == (1280, 4)
    x = torch.randn(2, 3, 64, 64)
    net.eval()
    assert net.forward_features(x).shape == (2, 1280)
    assert net(x).shape == (2, 4)


@pytest.mark.parametrize(("image_name", "expected"), [("china.jpg", "palace"), ("flower.jpg", "daisy")])
def test_bundled_lite0_classifies_real_photos(lite0_source, image_name, expected):
    """Real weights, correctly mapped: scikit-learn's sample photos land in sensible classes."""
    from sklearn.datasets import load_sample_image

    net = efficientnet_lite0(num_classes=2).eval()
    imagenet_head = nn.Linear(1280, 1000)
    imagenet_head.load_state_dict({"weight": lite0_source["_fc.weight"], "bias": lite0_source["_fc.bias"]})
    image = Image.fromarray(load_sample_image(image_name))
    x = build_transforms(LITE0_PREPROCESSING, train=False, augment={})(image).unsqueeze(0)
    with torch.no_grad():
        probs = imagenet_head(net.forward_features(x)).softmax(-1)[0]
    assert IMAGENET_CLASSES[int(probs.argmax())] == expected
    assert float(probs.max()) > 0.15


def test_random_lite0_differs_from_pretrained():
    pretrained, random = efficientnet_lite0(2), efficientnet_lite0(2, weights=None)
    assert not torch.equal(pretrained.backbone.conv_stem.weight, random.backbone.conv_stem.weight)
    assert pretrained.pretrained and not random.pretrained


# --------------------------------------------------------------------------- torchvision weights


def _place_in_cache(name: str, weights) -> dict[str, torch.Tensor]:
    """Put a checkpoint where torchvision expects the downloaded file; return its tensors."""
    torch.manual_seed(7)
    state = get_model(name, weights=None).state_dict()
    path = torchvision_cache_file(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_torchvision_enum_weights_load_from_torch_home_cache():
    state = _place_in_cache("resnet18", ResNet18_Weights.IMAGENET1K_V1)
    assert str(torchvision_cache_file(ResNet18_Weights.IMAGENET1K_V1)).startswith(
        str(Path(torch.hub.get_dir()))
    )
    net = torchvision_backbone("resnet18", num_classes=3, weights="IMAGENET1K_V1")
    assert torch.equal(net.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.backbone.layer4[1].bn2.running_mean, state["layer4.1.bn2.running_mean"])
    assert isinstance(net.backbone.fc, nn.Identity)
    assert (net.head.in_features, net.head.out_features) == (512, 3)
    # DEFAULT resolves to the same enum member, and so does the fully qualified name.
    assert resolve_torchvision_weights("resnet18", "DEFAULT") is ResNet18_Weights.IMAGENET1K_V1
    assert resolve_torchvision_weights("resnet18", "ResNet18_Weights.IMAGENET1K_V1") is (
        ResNet18_Weights.IMAGENET1K_V1
    )


def test_missing_weights_offline_names_the_expected_file():
    expected = torchvision_cache_file(ResNet18_Weights.IMAGENET1K_V1)
    assert not expected.exists()
    with pytest.raises(WeightsError) as info:
        torchvision_backbone("resnet18", num_classes=3, weights="DEFAULT")
    message = str(info.value)
    assert str(expected) in message
    assert "model.weights=null" in message and "model.weights=/path/to/file.pth" in message
    assert ResNet18_Weights.IMAGENET1K_V1.url in message


def test_corrupt_cached_weights_file_is_reported():
    path = torchvision_cache_file(ResNet18_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="delete it"):
        torchvision_backbone("resnet18", num_classes=3, weights="DEFAULT")


def test_typo_in_weights_name_lists_the_valid_choices():
    with pytest.raises(ConfigError) as info:
        torchvision_backbone("resnet50", num_classes=3, weights="IMAGENET1K_V3")
    assert "IMAGENET1K_V3" in str(info.value)
    assert "IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT" in str(info.value)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown torchvision model 'resnet19'"):
        torchvision_backbone("resnet19", num_classes=3, weights=None)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_loads_except_the_replaced_classifier(tmp_path, suffix):
    torch.manual_seed(3)
    source = get_model("resnet18", weights=None, num_classes=10).state_dict()  # other class count
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(source, str(path))
    else:
        torch.save({"state_dict": source}, path)
    net = torchvision_backbone("resnet18", num_classes=3, weights=str(path))
    assert torch.equal(net.backbone.conv1.weight, source["conv1.weight"])
    assert torch.equal(net.backbone.bn1.running_var, source["bn1.running_var"])


def test_state_dict_of_another_architecture_is_reported(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(get_model("resnet34", weights=None).state_dict(), path)
    with pytest.raises(WeightsError) as info:
        torchvision_backbone("resnet18", num_classes=3, weights=str(path))
    message = str(info.value)
    assert str(path) in message and "unexpected keys" in message and "layer1.2." in message


def test_missing_local_weights_file_is_reported(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        torchvision_backbone("resnet18", num_classes=3, weights=str(tmp_path / "nope.pth"))


# --------------------------------------------------------------------------- preprocessing


def preprocessing_on_meta(name: str, **kwargs):
    """Only the preprocessing is wanted: build on the meta device (no weights allocated)."""
    with torch.device("meta"):
        return torchvision_backbone(name, num_classes=2, weights=None, **kwargs).preprocessing


def test_preprocessing_follows_the_weights():
    resnet = preprocessing_on_meta("resnet50")
    assert (resnet.crop_size, resnet.resize_size) == (224, 232)  # IMAGENET1K_V2's recipe
    p = preprocessing_on_meta("inception_v3", aux_loss_weight=0)
    assert (p.crop_size, p.resize_size, p.min_size) == (299, 342, 75)
    b7, vit = preprocessing_on_meta("efficientnet_b7"), preprocessing_on_meta("vit_b_16")
    assert (b7.crop_size, b7.resize_size, b7.interpolation) == (600, 600, "bicubic")
    assert (vit.crop_size, vit.resize_size, vit.fixed_size) == (224, 256, True)
    assert LITE0_PREPROCESSING.mean == (0.5, 0.5, 0.5)
    smaller = resolve_input_size(resnet, 112)
    assert (smaller.crop_size, smaller.resize_size) == (112, 116)
    assert resolve_input_size(resnet, None) is resnet  # the weights' size by default


def test_input_size_below_the_minimum_is_a_config_error():
    inception = preprocessing_on_meta("inception_v3", aux_loss_weight=0)
    with pytest.raises(ConfigError, match="minimum input size is 75"):
        resolve_input_size(inception, 64)


def test_fixed_size_models_refuse_other_sizes_unless_the_size_is_only_a_preference(caplog):
    vit = preprocessing_on_meta("vit_b_32")
    assert vit.fixed_size and vit.crop_size == 224
    with pytest.raises(ConfigError, match=r"input\.image_size=64, but this backbone only accepts 224x224"):
        resolve_input_size(vit, 64)
    with caplog.at_level("INFO", logger="transfer_learning.preprocessing"):
        assert resolve_input_size(vit, 64, strict=False) is vit
    (line,) = [r.getMessage() for r in caplog.records]
    assert "input.image_size=64 does not apply" in line and "own size, 224 px" in line


def test_size_hints_are_off_while_a_checkpoint_is_loaded_and_errors_still_raise(caplog):
    """eval and predict load a trained checkpoint inside size_hints_off: no hint meant for setting
    up a run, the same errors, and the hints back afterwards."""
    vit = preprocessing_on_meta("vit_b_32")
    caplog.set_level("INFO", logger="transfer_learning.preprocessing")
    with size_hints_off():
        assert resolve_input_size(vit, 64, strict=False) is vit
        with pytest.raises(ConfigError, match="only accepts 224x224"):
            resolve_input_size(vit, 64)
    assert caplog.records == []
    assert resolve_input_size(vit, 64, strict=False) is vit
    assert ["does not apply" in r.getMessage() for r in caplog.records] == [True]


def test_network_needs_two_classes():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        Network(nn.Identity(), 4, 1, LITE0_PREPROCESSING, pretrained=False)


@pytest.mark.slow
def test_checkpoint_rebuilds_weight_dependent_architecture_without_the_weights(tmp_path, shapes_dir):
    """GoogLeNet's pretrained weights switch on transform_input; a checkpoint must keep it."""
    from torchvision.models import GoogLeNet_Weights

    from helpers import build, trainer
    from transfer_learning.model.module import TransferLearningModule

    torch.manual_seed(2)
    state = get_model("googlenet", weights=None, aux_logits=True, init_weights=True).state_dict()
    cache = torchvision_cache_file(GoogLeNet_Weights.IMAGENET1K_V1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, cache)
    module, datamodule = build(shapes_dir, "strategy=feature_extract", "model=googlenet", image_size=48)
    assert module.net.backbone.transform_input is True
    fit = trainer(max_steps=1)
    fit.fit(module, datamodule)
    path = tmp_path / "googlenet.ckpt"
    fit.save_checkpoint(path)
    cache.unlink()  # the pretrained file is gone: the checkpoint alone must do

    restored = TransferLearningModule.load_for_inference(path)
    assert restored.net.backbone.transform_input is True
    assert restored.preprocessing == module.preprocessing
    x = torch.randn(2, 3, 48, 48)
    module.eval()
    with torch.no_grad():
        assert torch.allclose(restored(x), module(x))
