"""Any classifier of ``torchvision.models`` as a backbone, with torchvision's weights handling:
an enum name, the ``$TORCH_HOME`` cache, a local file, and a clear error when offline."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from transfer_learning.errors import ConfigError, WeightsError
from transfer_learning.model.backbones.base import backbone_builder
from transfer_learning.model.backbones.surgery import (
    aux_classifier_paths,
    find_classifier,
    set_submodule,
    split_aux_heads,
)
from transfer_learning.model.backbones.weights_file import load_weights_file, looks_like_path
from transfer_learning.model.network import Network
from transfer_learning.preprocessing import Preprocessing
from transfer_learning.readers import pickle_free_library_loads

# Torchvision modules whose builders accept ``aux_logits``.
AUX_FAMILIES = ("inception", "googlenet")
# Architecture settings that torchvision builders derive from the weights; recorded so a
# checkpoint rebuilds the same network without the pretrained file.
ARCH_ATTRS = ("transform_input", "image_size")


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def resolve_torchvision_weights(name: str, weights: str | None) -> WeightsEnum | Path | None:
    """``DEFAULT``, an enum value (``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2``),
    a local file, or None (random init)."""
    if name not in torchvision_names():
        raise ConfigError(
            f"unknown torchvision model {name!r}. Choose one of "
            f"`python scripts/list_backbones.py` (e.g. resnet18, efficientnet_b0, vit_b_16)."
        )
    if weights is None or str(weights).lower() in ("none", "null", "random"):
        return None
    value = str(weights)
    if looks_like_path(value):
        return Path(value).expanduser()
    enum = torchvision.models.get_model_weights(name)
    try:
        return enum[value.rpartition(".")[2]]
    except KeyError:
        choices = ", ".join(enum.__members__)
        raise ConfigError(
            f"model.weights={value!r} is not a weights name of {name}. Valid: {choices}; "
            "or null for random init, or a path to a .pth / .safetensors file."
        ) from None


def torchvision_cache_file(weights: WeightsEnum) -> Path:
    """Where torchvision looks for (and downloads) these weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _preprocessing(name: str, weights: WeightsEnum | None, model: nn.Module) -> Preprocessing:
    reference = weights or torchvision.models.get_model_weights(name).DEFAULT
    t = reference.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    image_size = getattr(model, "image_size", None)  # ViT: positional embeddings fix the size
    if isinstance(image_size, int) and image_size != crop:
        resize, crop = round(image_size * resize / crop), image_size
    return Preprocessing(
        crop_size=crop,
        resize_size=resize,
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
        min_size=int(reference.meta.get("min_size", (1, 1))[0]),
        fixed_size=isinstance(image_size, int),
    )


def _build(name: str, weights: WeightsEnum | None, kwargs: dict[str, Any]) -> nn.Module:
    if weights is None:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    cache = torchvision_cache_file(weights)
    had_file = cache.is_file()
    try:
        with pickle_free_library_loads():  # torchvision would unpickle its cache file
            return torchvision.models.get_model(name, weights=weights, **kwargs)
    except Exception as exc:  # network, hash or unpickling failures all end here
        if had_file and isinstance(exc, pickle.UnpicklingError):
            raise WeightsError(
                f"refusing cached weights {cache} for {name}: it is not a file of plain tensors (damaged, "
                "or it holds Python objects that only pickle can rebuild, and unpickling a file can run "
                "code). torchvision's own weights are plain tensors: delete it and run again with network "
                "access, or copy the real file there."
            ) from None
        if had_file:
            raise WeightsError(
                f"cannot load cached weights {cache} for {name} ({exc}). The file may be "
                "corrupt: delete it and run again with network access."
            ) from exc
        raise WeightsError(
            f"weights {weights} for {name} are not in the torch hub cache and could not be "
            f"downloaded ({type(exc).__name__}: {exc}).\nExpected file: {cache}\nFixes: copy "
            f"{weights.url} to that path (TORCH_HOME={Path(torch.hub.get_dir()).parent}), or "
            "set model.weights=/path/to/file.pth, or model.weights=null for random init, or "
            "use the offline default model=efficientnet_lite0."
        ) from exc


def _aux_min_size(p: Preprocessing, name: str, kwargs: dict[str, Any]) -> int:
    """Auxiliary classifiers may need a larger input than the main path (Inception-v3: 299, not
    75). Find the smallest size whose training forward works, on the meta device (no compute)."""
    with torch.device("meta"):
        probe = torchvision.models.get_model(name, weights=None, **kwargs).train()

    def works(size: int) -> bool:
        try:
            probe(torch.empty(2, 3, size, size, device="meta"))
        except RuntimeError:
            return False
        return True

    low, high = p.min_size, p.crop_size  # the weights' own size always works
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if works(mid) else (mid + 1, high)
    return low


@backbone_builder
def torchvision_backbone(
    name: str,
    num_classes: int,
    weights: str | None = "DEFAULT",
    aux_loss_weight: float = 0.4,
    arch_kwargs: dict[str, Any] | None = None,
) -> Network:
    """Any classifier of ``torchvision.models`` as a backbone with a new head."""
    resolved = resolve_torchvision_weights(name, weights)
    enum = resolved if isinstance(resolved, WeightsEnum) else None
    kwargs = dict(arch_kwargs or {})
    builder = torchvision.models.get_model_builder(name)
    wants_aux = aux_loss_weight > 0
    if builder.__module__.rsplit(".", 1)[-1] in AUX_FAMILIES:
        kwargs.setdefault("aux_logits", wants_aux)
        if enum is None:
            kwargs.setdefault("init_weights", True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*auxiliary heads in the pretrained.*")
        model = _build(name, enum, kwargs)
    recorded = {a: getattr(model, a) for a in ARCH_ATTRS if isinstance(getattr(model, a, None), bool | int)}
    classifier, width = find_classifier(model)
    if isinstance(resolved, Path):
        load_weights_file(model, resolved, ignore=(classifier, *aux_classifier_paths(model)), name=name)
    aux_heads = split_aux_heads(model, num_classes) if wants_aux else []
    set_submodule(model, classifier, nn.Identity())
    preprocessing = _preprocessing(name, enum, model)
    aux_min_size = None
    if aux_heads:
        aux_min_size = _aux_min_size(preprocessing, name, {**kwargs, **recorded, "init_weights": False})
    return Network(
        backbone=model,
        num_features=width,
        num_classes=num_classes,
        preprocessing=preprocessing,
        pretrained=resolved is not None,
        aux_min_size=aux_min_size,
        aux_heads=aux_heads,
        aux_loss_weight=aux_loss_weight if aux_heads else 0.0,
        arch_kwargs=recorded,
    )
