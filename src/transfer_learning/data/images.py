"""Image files: finding them and decoding them the same way everywhere.

* :func:`list_images` walks a class folder once per real file: hidden entries (``.*``,
  ``__MACOSX``) are ignored at every level, symlink loops are detected instead of followed, a
  file reached twice through links counts once, and files with other extensions are counted.
  Only regular files are listed: FIFOs, devices and sockets (a FIFO named ``x.jpg`` blocks
  whoever opens it; a link to ``/dev/zero`` never ends) are named and left out.
* :func:`load_rgb` decodes any file the same way for training and prediction: EXIF
  orientation applied, 16- and 32-bit images scaled to 8 bits (not clipped to white),
  transparency composited onto white. Like the scan, it reads regular files only, and never
  more bytes than the file's size (:func:`read_regular`).

The decode scan before training is :mod:`transfer_learning.data.scan`.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from transfer_learning.errors import DataError
from transfer_learning.readers import file_kind, read_regular

log = logging.getLogger(__name__)

# Transparent pixels are shown on this background (what image viewers and browsers do).
ALPHA_BACKGROUND = (255, 255, 255)
HIDDEN_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


def is_hidden(name: str) -> bool:
    """Hidden files and folders, and the debris of archive tools and notebooks."""
    return name.startswith(".") or name in HIDDEN_NAMES


def is_image(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMG_EXTENSIONS


@dataclass
class Listing:
    """What a walk found and what it left out, and why."""

    files: list[Path] = field(default_factory=list)
    other_extensions: Counter[str] = field(default_factory=Counter)
    loops: list[str] = field(default_factory=list)
    repeated: int = 0  # files (or folders) reached again through a symlink: counted once
    unreadable: list[str] = field(default_factory=list)
    special: list[str] = field(default_factory=list)  # "path (a FIFO)": not regular files, not read

    @classmethod
    def merged(cls, listings: Iterable[Listing]) -> Listing:
        """What several walks left out, together (their files are not merged)."""
        out = cls()
        for listing in listings:
            out.other_extensions.update(listing.other_extensions)
            out.loops += listing.loops
            out.repeated += listing.repeated
            out.unreadable += listing.unreadable
            out.special += listing.special
        return out

    def notes(self) -> list[str]:
        """One line per kind of file left out."""
        out = []
        if self.other_extensions:
            kinds = ", ".join(f"{ext or '(none)'}: {n}" for ext, n in sorted(self.other_extensions.items()))
            out.append(
                f"left out {sum(self.other_extensions.values())} file(s) with unsupported extensions "
                f"({kinds}); supported: {' '.join(IMG_EXTENSIONS)}"
            )
        if self.loops:
            out.append(f"symlink loop(s) not followed: {'; '.join(self.loops[:5])}")
        if self.repeated:
            out.append(f"{self.repeated} file(s) or folder(s) reached twice through symlinks, counted once")
        if self.special:
            more = f"; and {len(self.special) - 5} more" if len(self.special) > 5 else ""
            out.append(
                f"left out {len(self.special)} file(s) that are not regular files (FIFOs, devices, "
                f"sockets; never opened): {'; '.join(self.special[:5])}{more}"
            )
        return out


def identity(path: Path) -> tuple[int, int]:
    """A file's or folder's identity on disk, the same through any symlink to it."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def list_images(
    folder: Path,
    seen: set[tuple[int, int]] | None = None,
    listing: Listing | None = None,
    boundaries: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
) -> Listing:
    """Every image file under ``folder`` (following symlinks, each real file once), sorted.

    A symlink back to a folder above (``loop -> ..``) or to one of ``boundaries`` (the data
    root, the split and class folders: following it would label other classes' files as this
    one) is reported, not followed."""
    listing = listing if listing is not None else Listing()
    seen = seen if seen is not None else set()

    def walk(directory: Path, ancestors: tuple[tuple[int, int], ...]) -> None:
        try:
            # Real entries before symlinks: a file reached both ways is listed under its own name.
            entries = sorted(os.scandir(directory), key=lambda e: (e.is_symlink(), e.name))
        except PermissionError:
            listing.unreadable.append(str(directory))
            return
        for entry in entries:
            if is_hidden(entry.name):
                continue
            path = Path(entry.path)
            try:
                info = path.stat()  # follows symlinks
            except OSError:  # a dangling symlink, or a loop the OS refuses to resolve
                if entry.is_symlink():
                    listing.loops.append(f"{path} -> {os.readlink(path)} (dangling or circular)")
                continue
            key = info.st_dev, info.st_ino
            if stat.S_ISDIR(info.st_mode):
                if key in ancestors or key in boundaries:
                    listing.loops.append(f"{path} -> {os.readlink(path) if entry.is_symlink() else path}")
                elif key in seen:
                    listing.repeated += 1
                else:
                    seen.add(key)
                    walk(path, (*ancestors, key))
            elif not stat.S_ISREG(info.st_mode):  # a FIFO, a device (a link to /dev/zero), a socket
                listing.special.append(f"{path} ({file_kind(info.st_mode)})")
            elif not is_image(path):
                listing.other_extensions[path.suffix.lower()] += 1
            elif key in seen:
                listing.repeated += 1
            else:
                seen.add(key)
                listing.files.append(path)

    try:
        root_key = identity(folder)
    except OSError as exc:
        raise DataError(f"cannot read folder {folder}: {exc.strerror}.") from exc
    seen.add(root_key)
    # A link to the folder itself or to any folder above it (`loop -> ..`) is a loop.
    above = tuple(identity(parent) for parent in folder.resolve().parents)
    walk(folder, (root_key, *above))
    listing.files.sort()
    return listing


# -- decoding ------------------------------------------------------------------------------


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images scaled to 0..255 (PIL would clip them)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "I":  # 32-bit integers; 16-bit PNGs often arrive in this mode
        top = 65535.0 if values.max(initial=0) <= 65535 else float(2**32 - 1)
    else:  # "F": floats, taken as 0..1 unless larger values say otherwise
        top = max(1.0, float(np.nanmax(values, initial=0.0)))
    scaled = np.clip(np.nan_to_num(values) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF orientation applied, high bit depths scaled,
    transparency composited onto :data:`ALPHA_BACKGROUND`."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode(data: bytes, name: str | Path) -> Image.Image:
    """The bytes of an image file, decoded to RGB (see :func:`to_rgb`)."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # named after the file, not the in-memory buffer
        raise UnidentifiedImageError(f"cannot identify image file {str(name)!r}") from None
    with image:
        image.load()
        return to_rgb(image)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode a regular file to RGB (see :func:`to_rgb`), naming the file on failure; FIFOs and
    devices are refused unopened, and no more than the file's size is read."""
    try:
        return decode(read_regular(path), path)
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


# -- the scan ------------------------------------------------------------------------------
