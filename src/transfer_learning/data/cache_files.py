"""Feature-cache files on disk: checked before they are trusted, written whole or not at all,
and built by one process per key.

A file is trusted only when it is a float32 ``.npy`` array (never pickled objects) of the shape
its key implies (views x images x features) with finite values throughout; anything else (cut
off by a crash or a full disk, overwritten, foreign) is damaged and the caller rebuilds it.
Writes go to a temporary file that is renamed over the cache file, so a reader sees the old
file or the new one, never half of one; a failed write leaves nothing behind. An exclusive
lock (``flock`` on ``<key>.lock`` next to the file, there only while held) lets one of several
processes with the same key (sweep jobs) build the file while the others wait, then read it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from transfer_learning.errors import TransferLearningError, byte_size
from transfer_learning.readers import read_array

log = logging.getLogger("transfer_learning.data.feature_cache")

# Values checked for finiteness at a time in a memory-mapped file (64 MB of float32).
CHECK_CHUNK = 1 << 24
FIX = "set paths.feature_cache_dir to another folder, or strategy.cache_features=false to run without a cache"


class FeatureCacheError(TransferLearningError):
    """The feature cache cannot be written or computed: the disk, the folder or the backbone."""


class DamagedCacheFile(Exception):
    """A cache file that must not be trusted; the message says what is wrong with it."""


def read_features(path: Path, views: int, rows: int) -> np.ndarray | None:
    """The stored (memory-mapped) array of ``path``; None when there is no such file.
    Raises :class:`DamagedCacheFile` when the file is not a whole, finite float32 array of
    ``views`` x ``rows`` x features."""
    try:
        array = read_array(path)
    except FileNotFoundError:
        return None
    except Exception as exc:  # cut off, random bytes, pickled objects, unreadable
        raise DamagedCacheFile(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(array, np.ndarray):  # a zip (.npz) archive under a .npy name
        array.close()
        raise DamagedCacheFile("not a single array")
    if array.dtype != np.float32 or array.ndim != 3 or array.shape[:2] != (views, rows) or not array.shape[2]:
        raise DamagedCacheFile(
            f"holds {array.dtype} {tuple(array.shape)}, expected float32 ({views}, {rows}, features)"
        )
    if not array.flags.c_contiguous:
        raise DamagedCacheFile("not in C order: not written by this cache")
    flat = array.reshape(-1)
    for start in range(0, flat.size, CHECK_CHUNK):
        if not np.isfinite(flat[start : start + CHECK_CHUNK]).all():
            raise DamagedCacheFile("holds NaN or infinite values")
    return array


def read_back(path: Path, views: int, rows: int) -> np.ndarray:
    """The file just written, checked like any other: a disk that did not keep it is an error."""
    try:
        array = read_features(path, views, rows)
        problem = "it is gone"
    except DamagedCacheFile as exc:
        array, problem = None, str(exc)
    if array is None:
        raise FeatureCacheError(
            f"The feature cache file {path} was unreadable right after writing it ({problem}): the disk "
            f"or filesystem is failing; {FIX}."
        )
    return array


@contextlib.contextmanager
def key_lock(path: Path) -> Iterator[bool]:
    """Held by one process at a time per cache file; yields whether the lock is really held
    (False where the folder or the filesystem allows no lock: then nothing waits). The lock
    file exists only while held: its holder removes it, and a waiter that then finds it gone or
    replaced takes the lock again on the current file."""
    make_folder(path.parent)
    lock = path.with_suffix(".lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            log.debug("No lock for %s (%s): building without waiting for other processes", path, exc)
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("Waiting for another process that is computing %s", path)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without locks (ENOLCK)
            os.close(fd)
            log.debug("No lock for %s (%s): building without waiting for other processes", path, exc)
            yield False
            return
        if same_file(fd, lock):
            break
        os.close(fd)  # the holder removed it after we opened it: lock the current one
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)  # releases the lock


def same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of this key left by a process that was killed while writing (only the
    holder of the key's lock writes them)."""
    for stale in path.parent.glob(f".{path.stem}-*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def write_features(path: Path, array: np.ndarray) -> None:
    """Store ``array`` at ``path`` whole, or raise :class:`FeatureCacheError` and leave nothing."""
    directory = path.parent
    make_folder(directory)
    needed = array.nbytes + 128  # the .npy header
    free = free_space(directory)
    if free is not None and free < needed:
        raise FeatureCacheError(disk_full(directory, needed, free))
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise FeatureCacheError(write_failure(path, needed, exc)) from exc
    try:
        with os.fdopen(handle, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # first: the free space is measured without it
        if isinstance(exc, OSError):
            raise FeatureCacheError(write_failure(path, needed, exc)) from exc
        raise


def write_failure(path: Path, needed: int, exc: OSError) -> str:
    free = free_space(path.parent)
    # numpy reports a short write as "N requested and M written", without an errno: a full disk.
    short_write = exc.errno is None and "requested and" in str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or short_write or (free is not None and free < needed):
        return disk_full(path.parent, needed, free)
    return f"Cannot write the feature cache file {path}: {exc}. Make the folder writable, or {FIX}."


def make_folder(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FeatureCacheError(f"Cannot create the feature cache folder {directory}: {exc}; {FIX}.") from exc


def free_space(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def disk_full(directory: Path, needed: int, free: int | None) -> str:
    room = "unknown" if free is None else byte_size(free)
    return (
        f"Feature cache: disk full at {directory}: {byte_size(needed)} needed, {room} free. "
        f"Free space there, or {FIX}."
    )
