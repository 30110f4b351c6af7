"""How images must be prepared for a network, and the one rule that decides the input size.

The pretrained weights fix the recipe (resize, crop, mean, std, interpolation). A data set may
ask for another input size; :func:`resolve_input_size` decides whether the model can take it.
The data module only ever receives the resolved :class:`Preprocessing`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

from transfer_learning.errors import ConfigError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize to ``resize_size``, centre-crop ``crop_size``, normalise; from the weights."""

    crop_size: int
    resize_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    min_size: int = 1
    fixed_size: bool = False
    min_size_note: str = ""

    def size_problem(self, crop_size: int) -> str | None:
        """Why this network cannot take ``crop_size`` inputs, or None when it can."""
        if crop_size == self.crop_size:
            return None
        if self.fixed_size:
            return f"this backbone only accepts {self.crop_size}x{self.crop_size} inputs"
        if crop_size < self.min_size:
            return f"this backbone's minimum input size is {self.min_size}{self.min_size_note}"
        return None

    def at_size(self, crop_size: int) -> Preprocessing:
        """The same recipe at another input size, keeping the resize/crop ratio."""
        if crop_size == self.crop_size:
            return self
        resize = round(crop_size * self.resize_size / self.crop_size)
        return replace(self, crop_size=crop_size, resize_size=resize)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        data = dict(values)
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        return cls(**data)


# Below this, a network that downsamples by 32 sees less than one pixel in its last feature map.
MIN_IMAGE_SIZE = 32


def resolve_input_size(weights: Preprocessing, requested: int | None, strict: bool = True) -> Preprocessing:
    """The input size rule: the weights' own size by default; ``requested`` (``input.image_size``)
    where the network can take it; otherwise a clear error, or, when the size is only a data
    set's preference (``strict=False``, the small demo images), the weights' size and one log line.
    """
    if requested is None:
        return weights
    if requested < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"input.image_size={requested}: too small to learn from. The backbones downsample by 32, "
            f"so below {MIN_IMAGE_SIZE} px their last feature map is under one pixel and the features "
            f"carry almost nothing (training ends near chance). Use {MIN_IMAGE_SIZE} px or more, or "
            f"input.image_size=null for the weights' own size ({weights.crop_size})."
        )
    problem = weights.size_problem(requested)
    if problem is None:
        if requested < weights.crop_size // 3:
            log.warning(
                "input.image_size=%d is far below the %d px the weights were trained at: pretrained "
                "features degrade at this size (expect lower accuracy).", requested, weights.crop_size,
            )  # fmt: skip
        return weights.at_size(requested)
    if strict:
        raise ConfigError(
            f"input.image_size={requested}, but {problem}. Set input.image_size=null (the weights' "
            f"size, {weights.crop_size}) or a size this backbone accepts."
        )
    log.info(
        "input.image_size=%d does not apply: %s. Training at the model's own size, %d px.",
        requested, problem, weights.crop_size,
    )  # fmt: skip
    return weights


@contextmanager
def size_hints_off() -> Iterator[None]:
    """While the block runs, :func:`resolve_input_size` logs errors only: its hints about the input
    size speak to a run being set up, not to a trained checkpoint loaded to evaluate or predict."""
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
