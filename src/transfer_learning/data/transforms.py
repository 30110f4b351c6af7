"""The image transforms: the network's evaluation transform (resize, centre crop, normalise) and
the training augmentation on top of it (``data.augment``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from transfer_learning.errors import ConfigError
from transfer_learning.preprocessing import Preprocessing

DEFAULT_AUGMENT: dict[str, Any] = {
    "enabled": True,
    "scale": (0.35, 1.0),
    "hflip": 0.5,
    "trivial_augment": False,
}


def augment_settings(augment: Mapping[str, Any] | None) -> dict[str, Any]:
    """``data.augment`` over the defaults; unknown keys are refused."""
    unknown = set(augment or {}) - set(DEFAULT_AUGMENT)
    if unknown:
        raise ConfigError(f"unknown data.augment keys {sorted(unknown)}; known: {sorted(DEFAULT_AUGMENT)}")
    return {**DEFAULT_AUGMENT, **(augment or {})}


def build_transforms(p: Preprocessing, train: bool, augment: Mapping[str, Any]) -> T.Compose:
    interpolation = InterpolationMode(p.interpolation)
    finish = [T.ToDtype(torch.float32, scale=True), T.Normalize(p.mean, p.std)]
    if not train or not augment.get("enabled", True):
        return T.Compose(
            [T.ToImage(), T.Resize(p.resize_size, interpolation, antialias=True),
             T.CenterCrop(p.crop_size), *finish]
        )  # fmt: skip
    steps: list[Any] = [
        T.ToImage(),
        T.RandomResizedCrop(p.crop_size, scale=tuple(augment["scale"]),
                            interpolation=interpolation, antialias=True),
    ]  # fmt: skip
    if augment["hflip"] > 0:
        steps.append(T.RandomHorizontalFlip(augment["hflip"]))
    if augment["trivial_augment"]:
        # On tensors its rotations and shears support nearest and bilinear only (not bicubic).
        steps.append(T.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    return T.Compose(steps + finish)
