"""Tensors and arrays read without pickle: checkpoints, weights files (and the libraries' own
weights caches), feature-cache arrays, and the metadata inside an exported model."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transfer_learning.errors import CheckpointError, byte_size
from transfer_learning.readers.files import SETTINGS_LIMIT, UntrustedFileError
from transfer_learning.readers.plain import check_plain


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint read without pickle (``weights_only=True``, whatever
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says), holding only tensors and plain values; errors
    name the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Check ckpt_path (runs keep theirs in "
            "logs/<task>/runs/<date>/checkpoints/)."
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects that only pickle can rebuild, and "
            f"unpickling a file can run arbitrary code ({str(exc).splitlines()[0]}). This template's "
            "checkpoints never need that; use a checkpoint it wrote, or one you trust after converting "
            "it to a plain state_dict."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        size = path.stat().st_size
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes): it is truncated or corrupt ({exc}). "
            "Use another checkpoint of the run (last.ckpt or best-*.ckpt)."
        ) from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"refusing checkpoint {path}: it holds a {type(checkpoint).__name__}, not a checkpoint."
        )
    try:
        check_plain(checkpoint, f"checkpoint {path}", tensors=True)
    except UntrustedFileError as exc:
        raise CheckpointError(str(exc)) from None
    return checkpoint


def read_weights(path: Path) -> Any:
    """What a weights file holds: a ``.safetensors`` file's tensors, or a ``torch.save`` file
    read with ``weights_only``. Errors reach the caller, which names the setting."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


_FORCE, _NO_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def pickle_free_library_loads() -> Iterator[None]:
    """Inside the block, every ``torch.load`` reads without pickle (``weights_only``), also
    where a library asks for pickle: torchvision reads its ``$TORCH_HOME`` weights cache with
    ``weights_only=False``, so a crafted cache file would run code when the model is built."""
    saved = {name: os.environ.get(name) for name in (_FORCE, _NO_FORCE)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_NO_FORCE, None)  # torch refuses both at once
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def read_array(path: Path) -> Any:
    """A ``.npy`` array, memory-mapped, never unpickled (``allow_pickle=False``): a pickled
    object array raises. Errors reach the caller (a cache rebuilds what it cannot read)."""
    import numpy as np

    return np.load(path, mmap_mode="r", allow_pickle=False)


# -- exported models -----------------------------------------------------------------------


def read_export_metadata(path: Path | str) -> dict[str, Any]:
    """The metadata inside an exported model: an ONNX file's ``metadata_props`` (nested values as
    JSON), or ``extra/metadata.json`` of a TorchScript archive, read from the zip without
    loading (so without compiling) the scripted code."""
    path = Path(path)
    fix = "Export the checkpoint again with scripts/export.py."
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        nested = ("class_names", "preprocessing", "thresholds", "temperature")
        out: dict[str, Any] = {}
        for key, value in props.items():
            try:
                out[key] = json.loads(value) if key in nested else value
            except ValueError:
                raise UntrustedFileError(
                    f"refusing {path}: its metadata {key!r} is not JSON. {fix}"
                ) from None
        check_plain(out, path)
        return out
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/extra/metadata.json")), None)
            if name is None:
                raise UntrustedFileError(f"refusing {path}: it holds no extra/metadata.json. {fix}".rstrip())
            info = archive.getinfo(name)
            if info.file_size > SETTINGS_LIMIT:
                raise UntrustedFileError(
                    f"refusing {path}: its metadata is {byte_size(info.file_size)}. {fix}"
                )
            text = archive.read(name).decode("utf-8")
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as exc:
        raise UntrustedFileError(
            f"cannot read {path}: not a TorchScript archive ({exc}). {fix}".rstrip()
        ) from None
    try:
        loaded = json.loads(text)
    except (ValueError, RecursionError):
        raise UntrustedFileError(f"refusing {path}: its metadata is not JSON. {fix}".rstrip()) from None
    if not isinstance(loaded, dict):
        raise UntrustedFileError(f"refusing {path}: its metadata is not a JSON object. {fix}".rstrip())
    check_plain(loaded, path)
    return loaded
