"""Any timm model as a backbone; pretrained weights come from the Hugging Face cache, read
offline at once when the hub cannot be reached."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from torch import nn

from transfer_learning.errors import ConfigError, WeightsError
from transfer_learning.model.backbones.base import backbone_builder
from transfer_learning.model.backbones.weights_file import load_weights_file
from transfer_learning.model.network import Network
from transfer_learning.preprocessing import Preprocessing
from transfer_learning.readers import pickle_free_library_loads

log = logging.getLogger(__name__)


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    fixed = bool(getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False))
    return Preprocessing(
        crop_size=crop,
        resize_size=int(crop / cfg.get("crop_pct", 0.875)),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bilinear"),
        min_size=crop if fixed else 1,
        fixed_size=fixed,
    )


def _host_reachable(url: str, timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy")):
        return True  # only the proxy knows; let the hub client try
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline_if_unreachable() -> Iterator[None]:
    """Without network, read the Hugging Face cache only: the hub client would otherwise retry
    for about a minute before giving up, even when the weights are cached."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _host_reachable(constants.ENDPOINT):
        yield
        return
    log.info("%s is unreachable: using the local Hugging Face cache only", constants.ENDPOINT)
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def timm_network(
    model: nn.Module, num_classes: int, preprocessing: Preprocessing, pretrained: bool
) -> Network:
    """A timm model with its classifier removed (``reset_classifier(0)``) and a new head."""
    model.reset_classifier(0)  # type: ignore[operator]
    # Models with a pre-logits layer (MobileNetV3: 288 channels -> 1024) return its width.
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return Network(
        backbone=model,
        num_features=int(width),  # type: ignore[arg-type]
        num_classes=num_classes,
        preprocessing=preprocessing,
        pretrained=pretrained,
    )


@backbone_builder
def timm_backbone(
    name: str,
    num_classes: int,
    weights: str | None = "pretrained",
    **create_kwargs: Any,
) -> Network:
    """A timm model: ``weights`` is ``pretrained`` (HF cache / download), a file, or null."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(
            f'unknown timm model {name!r}. List them with `python -c "import timm; '
            "print(timm.list_models('*resnet*'))\"`."
        )
    pretrained = weights is not None and str(weights).lower() == "pretrained"
    try:
        offline = _hub_offline_if_unreachable() if pretrained else contextlib.nullcontext()
        with offline, pickle_free_library_loads():
            model = timm.create_model(name, pretrained=pretrained, **create_kwargs)
    except Exception as exc:
        if not pretrained:
            raise
        from huggingface_hub.constants import HF_HUB_CACHE

        raise WeightsError(
            f"timm weights for {name} are not in the Hugging Face cache ({HF_HUB_CACHE}) and could "
            f"not be downloaded ({type(exc).__name__}). Fixes: download them once with network, set "
            "model.weights=/path/to/file.safetensors, or model.weights=null for random init."
        ) from exc
    if weights is not None and not pretrained:
        classifier = str(model.pretrained_cfg.get("classifier", "classifier"))  # type: ignore[union-attr,operator]
        load_weights_file(model, str(weights), ignore=(classifier,), name=name)
    return timm_network(model, num_classes, timm_preprocessing(model), pretrained=weights is not None)
