"""The decode scan, and the checks every listing goes through before anything trains, whatever
its source: files that were listed but are not there, problems the source found (class folders
without images), and images that cannot be decoded. Every image is decoded once, in parallel; the
verdicts are cached per file by size and modification time, so that a second run decodes nothing
(a scan cache that is damaged or not one is data: read as JSON, checked, named in a warning,
ignored and rebuilt). One message reports every problem, so one round of fixes repairs a data
set; with ``data.on_bad_file=skip`` missing and undecodable files are left out and counted."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from transfer_learning.data.images import decode, read_regular
from transfer_learning.data.sources.base import Listing
from transfer_learning.errors import DataError
from transfer_learning.readers import SCAN_CACHE_LIMIT, UntrustedFileError, read_json

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    bad: dict[str, str]  # path -> reason
    decoded: int  # files decoded by this scan (the others were known from the cache)
    total: int
    digests: dict[str, str] = field(default_factory=dict)  # path -> content hash (readable files)


def _fingerprint(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _check(path: Path) -> tuple[str | None, str | None]:
    """(problem or None, content hash or None) of one file: its bytes are read once (a regular
    file only, at most its size), hashed and decoded."""
    try:
        data = read_regular(path)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}", None
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        image = decode(data, path)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", digest
    if min(image.size) < 1:
        return "empty image (0 pixels)", digest
    return None, digest


def _cache_entry(value: object) -> bool:
    """``[size, mtime_ns, problem or null, digest or null]``, as :func:`scan_images` writes them."""
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value[:2])
        and all(v is None or isinstance(v, str) for v in value[2:])
    )


def read_scan_cache(cache_file: Path) -> dict[str, list]:
    """The scan cache in ``cache_file``; empty when there is none. A file that is not one (not
    JSON, another shape, truncated, not a regular file) is ignored, with one warning naming it:
    this scan rebuilds it."""
    if not os.path.lexists(cache_file):
        return {}
    try:
        data = read_json(cache_file, fix="", limit=SCAN_CACHE_LIMIT)
        problem = None if isinstance(data, dict) else f"JSON {type(data).__name__}, not an object"
        if problem is None:
            wrong = next((k for k, v in data.items() if not _cache_entry(v)), None)
            if wrong is not None:
                problem = f"entry {wrong[:200]!r} is not [size, mtime, problem, digest]"
    except UntrustedFileError as exc:  # not JSON, truncated, too big, unreadable, not a regular file
        problem = str(exc).removesuffix(".").split(f"{cache_file}: ", 1)[-1]
    if problem is None:
        return data
    log.warning("The image scan cache %s is damaged or not a scan cache (%s): ignored, and rebuilt by "
                "this scan.", cache_file, problem)  # fmt: skip
    return {}


def scan_images(files: Sequence[Path], cache_file: Path | None = None, workers: int = 8) -> ScanResult:
    """Decode every file (as training will) and hash its bytes; the results are cached by path,
    size and modification time."""
    cache: dict[str, list] = read_scan_cache(cache_file) if cache_file is not None else {}
    results: dict[str, tuple[str | None, str | None]] = {}
    todo: list[Path] = []
    fingerprints: dict[str, list[int]] = {}
    for path in files:
        key = str(path)
        try:
            fingerprints[key] = _fingerprint(path)
        except OSError as exc:
            results[key] = (f"cannot be opened: {exc.strerror}", None)
            continue
        known = cache.get(key)
        if known is not None and known[:2] == fingerprints[key]:
            results[key] = (known[2], known[3])
        else:
            todo.append(path)
    if todo:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for path, result in zip(todo, pool.map(_check, todo), strict=True):
                results[str(path)] = result
    if cache_file is not None and todo:
        cache.update({k: [*fingerprints[k], *v] for k, v in results.items() if k in fingerprints})
        _write_json(cache_file, cache)
    bad = {k: problem for k, (problem, _) in results.items() if problem is not None}
    digests = {k: digest for k, (problem, digest) in results.items() if problem is None and digest}
    return ScanResult(bad=bad, decoded=len(todo), total=len(files), digests=digests)


def _write_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError as exc:  # a read-only data folder: the scan simply runs again next time
        log.info("Could not write the image scan cache %s: %s", path, exc)


def scan_cache_file(folder: Path, root: Path) -> Path:
    """The scan cache of data root ``root``, kept in ``folder``."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return folder / f"{digest}.json"


def describe_bad(bad: dict[str, str], limit: int = 20) -> str:
    lines = [f"  {path}: {reason}" for path, reason in sorted(bad.items())[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def check_listing(
    listing: Listing, verify: bool, on_bad_file: str, cache_dir: Path | None, digests: dict[str, str]
) -> Listing:
    """``listing`` less the files left out (``listing.left_out`` counts them); the content
    hashes of the scanned files go into ``digests``. Raises one :class:`DataError` listing every
    problem when the files cannot be used as they are."""
    skip = on_bad_file == "skip"
    parts = list(listing.problems)
    if listing.missing and not skip:
        shown = "\n  ".join(list(listing.missing.values())[:20])
        more = f"\n  ... and {len(listing.missing) - 20} more" if len(listing.missing) > 20 else ""
        parts.append(
            f"{len(listing.missing)} listed file(s) do not exist ({listing.where}):\n  {shown}{more}\n"
            "Fix the paths (relative paths start at the CSV's folder, or at data.root when set), or set "
            "data.on_bad_file=skip to train without them."
        )
    bad: dict[str, str] = {}
    if verify:
        cache = scan_cache_file(cache_dir, listing.origin or Path(listing.where)) if cache_dir else None
        result = scan_images(listing.files, cache, workers=min(8, len(os.sched_getaffinity(0))))
        digests.update(result.digests)
        if result.decoded:
            log.info("Checked %d images by decoding them (%d known from the last scan)",
                     result.decoded, result.total - result.decoded)  # fmt: skip
        bad = result.bad
        if bad and not skip:
            parts.append(
                f"{len(bad)} image file(s) cannot be decoded:\n{describe_bad(bad)}\n"
                "Delete or replace them, or set data.on_bad_file=skip to train without them."
            )
    if parts:
        raise DataError("\n".join(parts))
    if listing.missing:
        log.warning("Leaving out %d listed file(s) that do not exist (data.on_bad_file=skip):\n  %s",
                    len(listing.missing), "\n  ".join(list(listing.missing.values())[:20]))  # fmt: skip
        listing.left_out["listed but missing"] = len(listing.missing)
    if not bad:
        return listing
    log.warning("Leaving out %d image file(s) that cannot be decoded (data.on_bad_file=skip):\n%s",
                len(bad), describe_bad(bad))  # fmt: skip
    kept = listing.subset([i for i, f in enumerate(listing.files) if str(f) not in bad])
    kept.left_out["cannot be decoded"] = kept.left_out.get("cannot be decoded", 0) + len(bad)
    present = {c for targets in kept.targets for c in targets}
    gone = [name for c, name in enumerate(kept.class_names) if c not in present]
    if gone:
        raise DataError(
            f"class(es) {gone} have no readable image left after skipping bad files ({listing.where}). "
            "Add readable images of them."
        )
    return kept
