"""Plain values only: scalars, lists and string-keyed dicts, nested to a bounded depth (tensors
where a checkpoint holds them); anything else is refused, naming the file and the field."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transfer_learning.readers.files import UntrustedFileError

MAX_DEPTH = 64  # nesting deeper than any file the template writes


def check_plain(
    value: Any, path: Path | str, field: str = "", *, interpolations: bool = True, tensors: bool = False
) -> None:
    """Refuse anything but plain values in ``value`` (read from ``path``), naming the field:
    scalars, lists, string-keyed dicts; tensors only where ``tensors``; strings OmegaConf would
    resolve only where ``interpolations``."""
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        item, where, depth = stack.pop()
        at = f"{where or 'the top level'}"
        if depth > MAX_DEPTH:
            raise UntrustedFileError(f"refusing {path}: {at} is nested over {MAX_DEPTH} levels deep.")
        if item is None or isinstance(item, bool | int | float):
            continue
        if isinstance(item, str):
            if not interpolations and "${" in item:
                raise UntrustedFileError(
                    f"refusing {path}: {at} holds {item[:80]!r}, an interpolation OmegaConf would resolve "
                    "(a file's settings are plain values only)."
                )
            continue
        if isinstance(item, list | tuple):
            stack += [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item)]
            continue
        if isinstance(item, Mapping):
            for key, v in item.items():
                if not isinstance(key, str | int) or isinstance(key, bool):
                    raise UntrustedFileError(f"refusing {path}: {at} has a {type(key).__name__} key.")
                stack.append((v, f"{where}.{key}" if where else str(key), depth + 1))
            continue
        if tensors and _is_tensor_value(item):
            continue
        raise UntrustedFileError(
            f"refusing {path}: {at} holds a {type(item).__name__}; such a file holds plain values only."
        )


def plain_or_refused(value: Any, path: Path, fix: str, interpolations: bool = True) -> None:
    """:func:`check_plain` of what a reader parsed, its refusal ending with ``fix``."""
    try:
        check_plain(value, path, interpolations=interpolations)
    except UntrustedFileError as exc:
        raise UntrustedFileError(f"{exc} {fix}".rstrip()) from None


def _is_tensor_value(item: Any) -> bool:
    """A tensor, or the few torch values a pickle-free checkpoint holds beside tensors."""
    import torch

    return isinstance(item, torch.Tensor | torch.Size | torch.dtype | torch.device)
