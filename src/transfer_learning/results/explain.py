"""Grad-CAM: where in the image the network looked for the class it was asked about.

Captum's ``LayerGradCam`` (pinned in pyproject.toml) weighs the feature maps of one layer by
the gradient of the class logit and keeps the positive part. Which layer is decided here only,
per backbone family (:data:`TARGET_LAYERS`): the last block whose output is still a spatial
feature map. A vision transformer has a grid of patch tokens instead; its tokens (after the
last block's first LayerNorm) are laid out as that grid (``[B, tokens, D] -> [B, D, h, w]``,
the class token left out) for the attribution; Swin's ``[B, H, W, C]`` maps are permuted. A
family not in the table gets the last module with a 4-D ``[B, C, H, W]`` output, found by one
forward pass.

Heatmaps are in the network's input frame (the centre crop), scaled to 0..1 per image;
:func:`to_original` maps one back onto the original image's pixels (zero outside the crop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from transfer_learning.data.images import load_rgb
from transfer_learning.data.transforms import build_transforms
from transfer_learning.preprocessing import Preprocessing


@dataclass(frozen=True)
class Target:
    """The layer to explain; ``prefix_tokens``: for token outputs ``[B, N, D]``, how many
    tokens come before the patch grid (None: a feature map); ``channels_last``: a feature map
    laid out ``[B, H, W, C]`` (Swin) rather than ``[B, C, H, W]``."""

    layer: nn.Module
    prefix_tokens: int | None = None
    channels_last: bool = False


def _vit(backbone: Any) -> Target:
    if hasattr(backbone, "encoder"):  # torchvision
        return Target(backbone.encoder.layers[-1].ln_1, 1)
    return Target(backbone.blocks[-1].norm1, int(getattr(backbone, "num_prefix_tokens", 1)))  # timm


# Backbone class name -> the attribute(s) holding its last spatial feature map, the first one
# the backbone has wins (torchvision and timm share some class names). The one place to add a
# family; a family not here (or with none of its attributes) gets its last 4-D output.
TARGET_LAYERS: dict[str, tuple[str, ...]] = {
    "ResNet": ("layer4",),
    "VGG": ("features",),
    "DenseNet": ("features",),
    "Inception3": ("Mixed_7c",),
    "GoogLeNet": ("inception5b",),
    "MobileNetV2": ("features",),
    "MobileNetV3": ("features", "blocks"),  # torchvision / timm (its conv_head runs after pooling)
    "ConvNeXt": ("features", "stages"),
    "RegNet": ("trunk_output", "s4"),
    "EfficientNet": ("features", "bn2"),  # torchvision / timm (Lite0 included)
}
TOKEN_LAYERS: dict[str, Callable[[Any], Target]] = {
    "VisionTransformer": _vit,
    "SwinTransformer": lambda b: Target(b.norm, channels_last=True),  # torchvision: [B, H, W, C]
}


def _last_feature_map(backbone: nn.Module, size: int) -> Target:
    """The last module whose output is ``[B, C, H, W]`` with H, W > 1 (one forward pass)."""
    found: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(
            lambda m, _i, out: (
                found.append(m) if torch.is_tensor(out) and out.ndim == 4 and out.shape[-1] > 1 else None
            )
        )
        for m in backbone.modules()
        if m is not backbone
    ]
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, size, size, device=next(backbone.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        raise ValueError(
            f"no spatial feature map in {type(backbone).__name__} for Grad-CAM: add its layer to "
            "transfer_learning.results.explain.TARGET_LAYERS."
        )
    return Target(found[-1])


def target_layer(backbone: Any, size: int) -> Target:
    name = type(backbone).__name__
    if name in TOKEN_LAYERS:
        return TOKEN_LAYERS[name](backbone)
    for attribute in TARGET_LAYERS.get(name, ()):
        if isinstance(getattr(backbone, attribute, None), nn.Module):
            return Target(getattr(backbone, attribute))
    return _last_feature_map(backbone, size)


class _Grid(nn.Module):
    """Identity on a ``[B, D, h, w]`` patch grid: the layer Captum explains for transformers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextmanager
def _token_grid(target: Target) -> Iterator[nn.Module]:
    """The module to explain: the target itself, or (tokens, channels-last maps) a
    ``[B, C, H, W]`` grid its output passes through."""
    if target.prefix_tokens is None and not target.channels_last:
        yield target.layer
        return
    grid, prefix = _Grid(), target.prefix_tokens or 0

    def route(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        if target.channels_last:
            return grid(out.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        batch, tokens, dim = out.shape
        side = round((tokens - prefix) ** 0.5)
        if side * side != tokens - prefix:
            raise ValueError(f"{tokens - prefix} patch tokens do not form a square grid")
        patches = grid(out[:, prefix:].transpose(1, 2).reshape(batch, dim, side, side))
        return torch.cat([out[:, :prefix], patches.flatten(2).transpose(1, 2)], dim=1)

    hook = target.layer.register_forward_hook(route)
    try:
        yield grid
    finally:
        hook.remove()


def gradcam(network: nn.Module, images: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Grad-CAM heatmaps ``[B, H, W]`` (the images' size, 0..1 per image) of ``network`` (the
    backbone + head, in eval mode) for ``classes[i]`` of image i."""
    from captum.attr import LayerAttribution, LayerGradCam

    backbone: Any = network.backbone
    target = target_layer(backbone, images.shape[-1])
    was_training = network.training
    network.eval()
    try:
        with torch.enable_grad(), _token_grid(target) as layer:
            # An input that requires grad: with a frozen backbone, gradients still reach the layer.
            x = images.detach().clone().requires_grad_(True)
            cam = LayerGradCam(network, layer).attribute(x, target=list(classes), relu_attributions=True)
            cam = LayerAttribution.interpolate(cam.detach().float(), tuple(images.shape[-2:]), "bilinear")
    finally:
        network.train(was_training)
    cam = cam[:, 0].clamp_min(0)
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return cam / peak


def to_original(heatmap: torch.Tensor, size: tuple[int, int], preprocessing: Preprocessing) -> np.ndarray:
    """A heatmap in the network's input frame (the centre crop of the resized image) as an array
    of the original image's ``size`` (width, height): the crop's area gets it, resized; the part
    of the image the crop left out gets 0."""
    width, height = size
    scale = preprocessing.resize_size / min(width, height)  # the shorter side -> resize_size
    crop = preprocessing.crop_size / scale  # the crop's side in original pixels
    left, top = (width - crop) / 2, (height - crop) / 2
    x0, y0 = max(0, round(left)), max(0, round(top))
    x1, y1 = min(width, round(left + crop)), min(height, round(top + crop))
    out = np.zeros((height, width), dtype=np.float32)
    if x1 > x0 and y1 > y0:
        resized = F.interpolate(heatmap[None, None].float(), size=(y1 - y0, x1 - x0), mode="bilinear")
        out[y0:y1, x0:x1] = resized[0, 0].clamp(0, 1).numpy()
    return out


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """``image`` with ``heatmap`` (its size, 0..1) on top in a colour map (red: looked at)."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(colours), alpha)


def explain_images(module: Any, images: Sequence[Image.Image], classes: Sequence[int]) -> list[np.ndarray]:
    """Grad-CAM heatmaps of ``classes[i]`` for ``images[i]`` (PIL, RGB), each at its image's own
    pixel size (0..1), through the module's validation preprocessing, on its device."""
    transform = build_transforms(module.preprocessing, train=False, augment={})
    device = next(module.parameters()).device
    x = torch.stack([transform(image) for image in images]).to(device)
    heatmaps = gradcam(module.net, x, classes).cpu()
    return [
        to_original(h, image.size, module.preprocessing) for h, image in zip(heatmaps, images, strict=True)
    ]


def class_to_explain(prediction: Any, class_names: Sequence[str]) -> int:
    """The predicted class (multi-label: the most probable one)."""
    if prediction.multilabel:
        return int(np.argmax([prediction.probabilities[n] for n in class_names]))
    return list(class_names).index(prediction.label)


def explain_predictions(
    module: Any, predictions: Sequence[Any], folder: Path, batch_size: int, progress: bool = False
) -> list[tuple[str, Path, Path]]:
    """For each prediction of an image file: ``<stem>.gradcam.png`` (the image with the Grad-CAM
    heatmap of its predicted class on top) and ``<stem>.gradcam.npy`` (the heatmap, float32
    0..1, the original image's height x width) in ``folder`` (a repeated stem gets ``-2``,
    ``-3``...). Runs in batches on the module's device. Returns (source, png, npy) per image."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    written: list[tuple[str, Path, Path]] = []
    for start in tqdm(
        range(0, len(predictions), batch_size), desc="Explaining", leave=False, disable=not progress
    ):
        chunk = predictions[start : start + batch_size]
        images = [load_rgb(p.source) for p in chunk]
        classes = [class_to_explain(p, module.class_names) for p in chunk]
        for prediction, image, full in zip(
            chunk, images, explain_images(module, images, classes), strict=True
        ):
            stem = Path(prediction.source).stem
            seen[stem] = seen.get(stem, 0) + 1
            name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
            png, npy = folder / f"{name}.gradcam.png", folder / f"{name}.gradcam.npy"
            overlay(image, full).save(png)
            np.save(npy, full)
            written.append((prediction.source, png, npy))
    return written
