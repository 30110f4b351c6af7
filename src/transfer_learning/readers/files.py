"""Regular files, read whole and capped in size: the first step of every reader.

A FIFO, device, socket or folder is refused without being opened for reading, and a file over
its reader's limit before a byte of it is parsed.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from transfer_learning.errors import TransferLearningError, byte_size

KiB, MiB = 1 << 10, 1 << 20
SETTINGS_LIMIT = 1 * MiB  # a run's saved settings, run_config.yaml, threshold and job files
SUMMARY_LIMIT = 16 * MiB  # summary.json (per-class tables), a metrics CSV
SCAN_CACHE_LIMIT = 512 * MiB  # one short entry per image: millions of images fit


class UntrustedFileError(TransferLearningError, ValueError):
    """A file read back is not what the template writes: too big, not plain data, or code."""


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


def read_text(path: Path, limit: int, fix: str) -> str:
    """The UTF-8 text of a regular file (a BOM dropped); ``fix`` ends the refusal of any other."""
    try:
        return read_regular(path, limit).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(
            f"cannot read {path}: not UTF-8 text ({exc.reason}). {fix}".rstrip()
        ) from None
    except OSError as exc:
        raise UntrustedFileError(f"cannot read {path}: {exc.strerror or exc}. {fix}".rstrip()) from None
