"""Every file the template reads back, read here as plain data, and nowhere else.

A run folder, a checkpoint or a cache is the kind of thing people pass around ("here is my run,
continue it"), so each is read as data a stranger may have written: checkpoints (pickle-free),
a run folder's saved settings and ``run_config.yaml``, ``<checkpoint>.threshold.json``,
``summary.json``, a sweep's ``job.json`` files, the scan cache and feature-cache arrays, the
CSV files of a run or of labels, weights files and the metadata inside an exported model.

Each reader returns plain values (``str``, ``int``, ``float``, ``bool``, ``None``, lists and
string-keyed dicts; tensors or arrays where the file is one) or refuses the file with an
:class:`UntrustedFileError` that names the file, the field and the fix. Nothing read here is
imported, instantiated, unpickled, evaluated or resolved:

* YAML: a loader that builds no Python object from a tag (``!!python/object`` and every other
  explicit tag are refused), follows no anchor or alias (a billion-laughs file is refused at its
  first ``&``), and leaves dates as text;
* config files: a string OmegaConf would resolve (``${oc.env:HOME}``, ``${...}``) is refused;
* every text file is capped in size before it is parsed, and only regular files are opened
  (a FIFO would block, ``/dev/zero`` never ends).

What the plain values may then *build* is :mod:`transfer_learning.run.registry`'s business
(allow-lists); which saved settings a resume puts back is :mod:`transfer_learning.run.resume`'s.
``tests/test_untrusted_files.py`` fails when a parsing call (``json.load``, ``yaml.*load``,
``torch.load``, ``np.load``, ``OmegaConf.load``, ``csv.reader``, pickle...) appears outside this
module.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import pickle
import stat
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from transfer_learning.errors import CheckpointError, TransferLearningError, byte_size

KiB, MiB = 1 << 10, 1 << 20
SETTINGS_LIMIT = 1 * MiB  # a run's saved settings, run_config.yaml, threshold and job files
SUMMARY_LIMIT = 16 * MiB  # summary.json (per-class tables), a metrics CSV
SCAN_CACHE_LIMIT = 512 * MiB  # one short entry per image: millions of images fit
MAX_DEPTH = 64  # nesting deeper than any file the template writes
_NO_DEFAULT: Any = object()


class UntrustedFileError(TransferLearningError, ValueError):
    """A file read back is not what the template writes: too big, not plain data, or code."""


# -- bytes ---------------------------------------------------------------------------------


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, from its ``st_mode``."""
    kinds = (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


class NotRegularFile(OSError):
    """A FIFO, device or socket where a file was expected: never opened for reading."""

    def __init__(self, path: Path | str, mode: int) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({file_kind(mode)})", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


class TooLarge(OSError):
    """A file over the size its reader takes: refused before a byte of it is parsed."""

    def __init__(self, path: Path | str, size: int, limit: int) -> None:
        super().__init__(errno.EFBIG, f"{byte_size(size)}, over the {byte_size(limit)} such a file may be")
        self.filename = str(path)

    def __str__(self) -> str:
        return str(self.strerror)


def read_regular(path: Path | str, limit: int | None = None) -> bytes:
    """The bytes of a regular file, at most its size at opening (a file that grows while it is
    read is cut there). Anything else (FIFO, device, socket, folder) raises
    :class:`NotRegularFile` without being opened (or, replaced in between, without being read);
    a file over ``limit`` bytes raises :class:`TooLarge` unread."""
    info = os.stat(path)  # follows symlinks: a link to /dev/zero is a character device
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFile(path, info.st_mode)
    # O_NONBLOCK: should the file have become a FIFO since, opening it does not wait for a writer.
    extra = ("O_NONBLOCK", "O_NOCTTY", "O_BINARY")  # those this system has
    fd = os.open(path, os.O_RDONLY | sum(getattr(os, flag, 0) for flag in extra))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path, info.st_mode)
        if limit is not None and info.st_size > limit:
            raise TooLarge(path, info.st_size, limit)
        chunks, left = [], info.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _text(path: Path, limit: int, fix: str) -> str:
    try:
        return read_regular(path, limit).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(
            f"cannot read {path}: not UTF-8 text ({exc.reason}). {fix}".rstrip()
        ) from None
    except OSError as exc:
        raise UntrustedFileError(f"cannot read {path}: {exc.strerror or exc}. {fix}".rstrip()) from None


# -- plain values --------------------------------------------------------------------------


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


def _plain_or_refused(value: Any, path: Path, fix: str, interpolations: bool = True) -> None:
    try:
        check_plain(value, path, interpolations=interpolations)
    except UntrustedFileError as exc:
        raise UntrustedFileError(f"{exc} {fix}".rstrip()) from None


def _is_tensor_value(item: Any) -> bool:
    """A tensor, or the few torch values a pickle-free checkpoint holds beside tensors."""
    import torch

    return isinstance(item, torch.Tensor | torch.Size | torch.dtype | torch.device)


# -- YAML ----------------------------------------------------------------------------------


def _yaml_loader() -> type:
    import yaml

    class PlainLoader(yaml.SafeLoader):
        """SafeLoader without anchors, aliases, explicit tags or dates."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            mark = f"line {event.start_mark.line + 1}"
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise yaml.YAMLError(f"a YAML anchor or alias (&name / *name) at {mark}")
            tag = getattr(event, "tag", None)
            if tag not in (None, "!"):
                raise yaml.YAMLError(f"the YAML tag {tag} at {mark}")
            return super().compose_node(parent, index)

    PlainLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return PlainLoader


def read_yaml(
    path: Path | str, *, fix: str, limit: int = SETTINGS_LIMIT, interpolations: bool = False
) -> Any:
    """The plain values of a YAML file; ``fix`` ends every refusal (what the user can do)."""
    import yaml

    path = Path(path)
    text = _text(path, limit, fix)
    try:
        loaded = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise UntrustedFileError(
            f"refusing {path}: it holds {detail[:300]}, not plain settings. {fix}"
        ) from None
    except RecursionError:
        raise UntrustedFileError(f"refusing {path}: nested too deep. {fix}".rstrip()) from None
    _plain_or_refused(loaded, path, fix, interpolations=interpolations)
    return loaded


def read_string_list(path: Path | str, *, fix: str) -> list[str]:
    """A YAML list of strings (a run's saved command-line settings); empty for an empty file."""
    loaded = read_yaml(path, fix=fix, interpolations=True)  # each string is judged as a setting
    if loaded is None:
        return []
    if not isinstance(loaded, list) or not all(isinstance(o, str) for o in loaded):
        raise UntrustedFileError(f"refusing {path}: it is not a list of settings. {fix}".rstrip())
    return loaded


def read_config(path: Path | str, *, fix: str) -> dict[str, Any]:
    """A YAML mapping of plain settings (``run_config.yaml``), with no interpolation in it."""
    loaded = read_yaml(path, fix=fix)
    if not isinstance(loaded, dict):
        raise UntrustedFileError(f"refusing {path}: it holds no mapping of settings. {fix}".rstrip())
    return loaded


# -- JSON ----------------------------------------------------------------------------------


def read_json(path: Path | str, *, fix: str, limit: int = SETTINGS_LIMIT) -> Any:
    """The plain values of a JSON file (size capped before parsing, nesting bounded)."""
    path = Path(path)
    text = _text(path, limit, fix)
    try:
        loaded = json.loads(text)
    except ValueError as exc:
        raise UntrustedFileError(f"cannot read {path}: not JSON ({exc}). {fix}".rstrip()) from None
    except RecursionError:
        raise UntrustedFileError(f"refusing {path}: nested too deep. {fix}".rstrip()) from None
    _plain_or_refused(loaded, path, fix)
    return loaded


def json_field(path: Path | str, key: str, *, fix: str, default: Any = _NO_DEFAULT) -> Any:
    """One field of a JSON object file; ``default`` when the file or the field is missing."""
    path = Path(path)
    if default is not _NO_DEFAULT and not path.is_file():
        return default
    data = read_json(path, fix=fix)
    if not isinstance(data, dict):
        raise UntrustedFileError(f"refusing {path}: it is not a JSON object. {fix}".rstrip())
    if key not in data and default is _NO_DEFAULT:
        raise UntrustedFileError(f"refusing {path}: it has no {key!r} field. {fix}".rstrip())
    return data.get(key, default)


# -- CSV -----------------------------------------------------------------------------------


def read_csv_rows(path: Path | str, limit: int | None = None) -> list[list[str]]:
    """Every row of a CSV file, as text cells (a BOM dropped). ``UnicodeDecodeError`` and
    ``csv.Error`` reach the caller, which knows what the file was for."""
    text = read_regular(path, limit).decode("utf-8-sig")
    return list(csv.reader(io.StringIO(text, newline="")))


def read_csv_records(
    path: Path | str, limit: int | None = SUMMARY_LIMIT
) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows (as header -> cell) of a CSV file; ``([], [])`` without one."""
    if not Path(path).is_file():
        return [], []
    reader = csv.DictReader(io.StringIO(read_regular(path, limit).decode("utf-8-sig"), newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


# -- tensors and arrays ----------------------------------------------------------------------


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
