"""Reading a local state_dict file (.pth, .pt, .bin, .ckpt, .safetensors) into a backbone."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_learning.errors import WeightsError
from transfer_learning.readers import read_weights

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def looks_like_path(value: str) -> bool:
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
        state: Any = read_weights(file)
    except Exception as exc:  # any unreadable file: report which one
        raise WeightsError(
            f"cannot read weights file {file} ({file.stat().st_size} bytes): it is not a PyTorch "
            f"state_dict (torch.save, .pth/.pt) or a .safetensors file, or it is damaged "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). Download "
            "it again, or point model.weights at the right file."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{file} holds no state_dict (a mapping of names to tensors)")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


def load_weights_file(model: nn.Module, path: str | Path, ignore: tuple[str, ...], name: str) -> None:
    """Load a local state_dict, tolerating only differences in the replaced classifier(s)."""
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
