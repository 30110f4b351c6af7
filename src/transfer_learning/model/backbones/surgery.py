"""Classifier surgery on torchvision models: find the classifier wherever the family keeps it,
replace it, and move auxiliary classifiers out into heads of their own."""

from __future__ import annotations

from torch import nn

from transfer_learning.errors import ConfigError
from transfer_learning.model.network import AUX_ATTRS

# Where torchvision families keep their classifier, in the order we look for it.
# A Sequential there means "its last Linear (or 1x1 Conv2d, for SqueezeNet)".
CLASSIFIER_ATTRS = ("fc", "classifier", "heads", "head")


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def last_layer(module: nn.Module, prefix: str) -> tuple[str, nn.Linear | nn.Conv2d] | None:
    """Dotted path and module of the last Linear / Conv2d in ``module`` (itself included)."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        return prefix, module
    for name, child in reversed(list(module.named_children())):
        found = last_layer(child, f"{prefix}.{name}")
        if found is not None:
            return found
    return None


def find_classifier(model: nn.Module) -> tuple[str, int]:
    """Dotted path of the final classification layer and its input width."""
    for attr in CLASSIFIER_ATTRS:
        module = getattr(model, attr, None)
        if not isinstance(module, nn.Module):
            continue
        found = last_layer(module, attr)
        if found is not None:
            path, layer = found
            width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
            return path, int(width)
    raise ConfigError(
        f"cannot find the classifier of {type(model).__name__}: none of "
        f"{', '.join(CLASSIFIER_ATTRS)} ends in a Linear layer. Add its attribute to "
        "transfer_learning.model.backbones.surgery.CLASSIFIER_ATTRS."
    )


def aux_classifier_paths(model: nn.Module) -> list[str]:
    """Dotted paths of the final Linear of each auxiliary classifier."""
    paths = []
    for attr in AUX_ATTRS:
        aux = getattr(model, attr, None)
        found = last_layer(aux, attr) if isinstance(aux, nn.Module) else None
        if found:
            paths.append(found[0])
    return paths


def split_aux_heads(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Move auxiliary classifiers out of ``model`` and re-size their last Linear."""
    heads = []
    for attr in AUX_ATTRS:
        aux = getattr(model, attr, None)
        if not isinstance(aux, nn.Module) or isinstance(aux, nn.Identity):
            continue
        found = last_layer(aux, attr)
        if found is None or not isinstance(found[1], nn.Linear):
            raise ConfigError(f"auxiliary classifier {attr} of {type(model).__name__} has no Linear")
        set_submodule(model, found[0], nn.Linear(found[1].in_features, num_classes))
        heads.append(aux)
        setattr(model, attr, nn.Identity())
    return heads
