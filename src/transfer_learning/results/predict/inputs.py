"""The inputs of a prediction: the image files that paths, folders and glob patterns name (each
real file once, only regular files), the inputs skipped with why (:class:`BadInput`,
:func:`problem`), and the inputs decoded and preprocessed for the network (the loader's dataset
and batches: a file that fails gives its reason, not a tensor)."""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_pil_image

from transfer_learning.data.images import Listing, identity, is_image, list_images, load_rgb, to_rgb
from transfer_learning.errors import DataError
from transfer_learning.readers import NotRegularFile, file_kind

Input: TypeAlias = str | Path | Image.Image | torch.Tensor
GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class BadInput:
    """An input that was skipped: the path (or pattern) as given, and why. ``kind``: ``file``,
    ``folder`` (no image files in it, or unreadable) or ``pattern`` (a glob matching nothing)."""

    source: str
    reason: str
    kind: str = "file"

    def message(self) -> str:
        if self.kind == "file":
            return f"cannot read image {self.source}: {self.reason}"
        return f"{self.source}: {self.reason}"


def problem(exc: BaseException) -> str:
    """Why a file could not be decoded, in one line."""
    cause = exc.__cause__ if isinstance(exc, DataError) and exc.__cause__ else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


# -- finding the files ---------------------------------------------------------------------


def has_glob(text: str) -> bool:
    return any(c in GLOB_CHARACTERS for c in text)


def expand_paths(paths: Sequence[str | Path]) -> tuple[list[Path], list[BadInput], Listing]:
    """The image files that ``paths`` name, in order, each real file once: files as given (any
    extension: they are decoded to find out), folders walked recursively and glob patterns
    expanded (both keep image extensions only and leave hidden entries out). Returns the files,
    the inputs that name nothing usable, and what was left out (:meth:`Listing.notes`)."""
    files: list[Path] = []
    bad: list[BadInput] = []
    walks: list[Listing] = [Listing()]  # the first one: files left out of glob matches
    seen: set[tuple[int, int]] = set()

    def add(path: Path, given: str, matched: bool) -> bool:
        """Whether ``path`` (named, or ``matched`` by a pattern) holds images or was seen before."""
        if matched and identity(path.parent) in seen:  # a folder walked already holds it
            return True
        if not path.is_dir():
            if matched and not is_image(path):
                walks[0].other_extensions[path.suffix.lower()] += 1
                return False
            try:
                info = path.stat()
            except OSError as exc:  # a dangling symlink matched by a pattern
                bad.append(BadInput(given, exc.strerror or str(exc)))
                return True
            if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero never ends: not opened
                if matched:
                    walks[0].special.append(f"{path} ({file_kind(info.st_mode)})")
                    return False
                bad.append(BadInput(given, str(NotRegularFile(path, info.st_mode))))
                return True
            key = info.st_dev, info.st_ino
            if key not in seen:
                seen.add(key)
                files.append(path)
            return True
        if identity(path) in seen:  # walked already (`photos photos/sub`, or `photos/**`)
            return True
        try:
            listing = list_images(path, seen=seen)
        except DataError as exc:
            bad.append(BadInput(given, problem(exc), "folder"))
            return True
        walks.append(listing)
        files.extend(listing.files)
        bad.extend(BadInput(folder, "cannot be read (permission denied)", "folder")
                   for folder in listing.unreadable)  # fmt: skip
        found = bool(listing.files or listing.repeated or listing.unreadable)
        if not found and not matched:
            bad.append(BadInput(given, "no image files in this folder", "folder"))
        return found

    for item in paths:
        text = str(item)
        path = Path(text)
        if path.exists():
            add(path, text, matched=False)
        elif has_glob(text) and not os.path.lexists(text):
            matches = sorted(glob.glob(text, recursive=True))
            found = [add(Path(match), match, matched=True) for match in matches]
            if not any(found):
                bad.append(BadInput(text, "no image file matches this pattern", "pattern"))
        else:  # missing, or a dangling symlink
            bad.append(BadInput(text, "No such file or directory"))
    left_out = Listing.merged(walks)
    left_out.repeated = 0  # a file named twice (or reached through a link) is simply predicted once
    return files, bad, left_out


# -- decoding ------------------------------------------------------------------------------


def check_tensor(tensor: torch.Tensor) -> None:
    """An image tensor: (C, H, W) with 1, 3 or 4 channels, uint8 or floating point."""
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"expected an image tensor of shape (C, H, W) with C in 1, 3, 4, got {tuple(tensor.shape)}"
        )
    if not (tensor.is_floating_point() or tensor.dtype == torch.uint8):
        raise ValueError(f"expected a uint8 or floating point image tensor, got {tensor.dtype}")


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """A CHW image tensor (1, 3 or 4 channels) as a PIL image: uint8 values 0..255, or floating
    point values 0..1 (rounded to 8 bits, as a file would hold them; outside 0..1 clipped)."""
    check_tensor(tensor)
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = (tensor.float() * 255).round().clamp(0, 255).to(torch.uint8)
    return to_pil_image(tensor)


def describe(source: Input, index: int) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return f"<{'image' if isinstance(source, Image.Image) else 'tensor'} {index}>"


class _Images(Dataset):
    """The inputs, each decoded and preprocessed as for validation; a file that fails gives its
    reason instead of a tensor (so a loader worker never raises)."""

    def __init__(self, inputs: Sequence[Input], transform: Any) -> None:
        self.inputs = inputs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.inputs[index]
        try:
            if isinstance(item, Image.Image):
                image = to_rgb(item)
            elif isinstance(item, torch.Tensor):
                image = to_rgb(tensor_to_image(item))
            else:
                image = load_rgb(item)
            if min(image.size) < 1:
                return index, None, "empty image (0 pixels)"
            return index, self.transform(image), None
        except Exception as exc:
            return index, None, problem(exc)


def _collate(
    batch: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, reason or "unknown error") for i, x, reason in batch if x is None]
    stacked = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], stacked, failed
