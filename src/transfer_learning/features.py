"""Where data and model meet: a frozen backbone's features as plain tensors.

Feature extraction trains the head on features the backbone computed once
(:class:`~transfer_learning.data.feature_cache.FeatureCache`); the data module hands them over as
:class:`CachedFeatures`, and the LightningModule computes the same features during training
with :func:`infer_features`. Both sides import this module, never each other's internals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from transfer_learning.errors import ConfigError
from transfer_learning.hardware import cpu_has_bf16, gpu_has_bf16

# strategy.cached_batch_size=auto: a feature vector costs a few kB, so the batch grows with the data
# (fewer optimizer steps, each with little Lightning overhead) up to 128 rows, keeping at least 8
# steps per epoch: on scikit-learn's digits (1,079 training images) 128 rows matched batches of 32
# (test accuracy 0.889 vs 0.888, two seeds) where 256 lost 2.7 points and 1,024 lost 25; on
# the 180-image demo set one batch of 128 per epoch lost 7 points.
CACHED_BATCH_MAX = 128
CACHED_MIN_STEPS = 8


def check_cached_batch_size(setting: Any) -> int | str | None:
    """``strategy.cached_batch_size``: ``auto``, a positive number, or null."""
    number = isinstance(setting, int) and not isinstance(setting, bool)
    if setting is None or setting == "auto" or (number and setting >= 1):
        return setting
    raise ConfigError(
        f"strategy.cached_batch_size={setting}: use auto (grows with the data, up to "
        f"{CACHED_BATCH_MAX}), a positive number, or null (data.batch_size)."
    )


class CachedFeatures(Dataset):
    """(feature vector, target) pairs; with several views, the epoch picks which one
    (:meth:`set_epoch`, or ``epoch_of``: a function the data module sets that returns the
    current epoch). ``labels``: class indices, or 0/1 rows (multi-label: float32 multi-hot
    targets). ``kept``: the positions (in the order of the images it was computed from) it
    holds when some images were skipped as unreadable; None when it holds them all."""

    def __init__(self, features: torch.Tensor, labels: Sequence[Any], kept: list[int] | None = None) -> None:
        if features.ndim != 3 or features.shape[1] != len(labels):
            raise ValueError(f"features of shape {tuple(features.shape)} do not match {len(labels)} labels")
        self.features = features
        table = torch.as_tensor([list(t) if isinstance(t, tuple | list) else t for t in labels])
        self.labels = table.float() if table.ndim == 2 else table.long()
        self.kept = kept
        self.view = 0
        self.epoch_of: Callable[[], int] | None = None

    @property
    def views(self) -> int:
        return int(self.features.shape[0])

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = self.epoch_of() % self.views if self.epoch_of is not None else self.view
        return self.features[view, index], self.labels[index]


def use_bf16(choice: bool | None, device: torch.device) -> bool:
    """``choice`` when set; None: bf16 where the hardware runs it natively (GPUs from Ampere on,
    CPUs with AVX-512 BF16 or AMX)."""
    if choice is not None:
        return bool(choice)
    if device.type == "cuda":
        return gpu_has_bf16(device.index or 0)
    return device.type == "cpu" and cpu_has_bf16()


def is_convolutional(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def infer_features(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, bf16: bool, channels_last: bool
) -> torch.Tensor:
    """A frozen backbone's forward pass as pure inference: no autograd, channels_last when asked,
    bf16 autocast when ``bf16``; float32 features come out (head, loss and optimizer stay fp32)."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(images.device.type, torch.bfloat16, enabled=bf16):
        return forward(images).float()


@contextlib.contextmanager
def fast_inference(backbone: nn.Module, device: torch.device, bf16: bool) -> Iterator[Callable]:
    """The backbone as a function of a batch on any device, in eval mode, through
    :func:`infer_features` (channels_last for convolutional networks)."""
    was_training = backbone.training
    backbone.eval()
    channels_last = is_convolutional(backbone)

    def forward(images: torch.Tensor) -> torch.Tensor:
        return infer_features(backbone, images.to(device, non_blocking=True), bf16, channels_last)

    try:
        yield forward
    finally:
        backbone.train(was_training)
