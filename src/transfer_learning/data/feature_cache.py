"""Features of a frozen backbone, computed once per image and stored on disk.

Feature extraction trains only the head, so the backbone's output for an image never changes:
running the backbone every epoch repeats the same work. The cache runs it once (``views`` times
per training image when augmenting) and the head trains on the stored tensors.

A cache file is named by a key over everything its numbers depend on: the backbone's weights
(hashed), the preprocessing and augmentation, the number of views and their seed, the
precision, and every image file (path, size, modification time) with its label. Any change
means another key, so a stale cache is never read; runs and sweep jobs with the same key share
one file: the first process to need a key computes it while the others wait (a lock file),
then they read it. A file is trusted only when whole and finite (see :mod:`cache_files`); a
damaged one is rebuilt. Non-finite features are never stored: the build stops with the cause.

With ``data.on_bad_file=skip`` an image that breaks after the scan is left out with its label
(:attr:`CachedFeatures.kept`); such a partial result is not stored.

Training views are exact when ``views == 1`` (the deterministic evaluation transform). With
``views > 1`` every image is stored under ``views`` random augmentations and epoch ``e`` reads
view ``e % views``: an approximation of on-the-fly augmentation, which would draw a new
augmentation every epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transfer_learning.data.cache_files import (
    DamagedCacheFile,
    FeatureCacheError,
    key_lock,
    read_back,
    read_features,
    remove_stale_temporaries,
    write_features,
)
from transfer_learning.data.skipping import collate_present, kept_positions
from transfer_learning.errors import DataError
from transfer_learning.features import CachedFeatures, fast_inference, use_bf16

log = logging.getLogger(__name__)

# Above this share of the available memory a cache is memory-mapped instead of loaded.
IN_MEMORY_SHARE = 0.25


def weights_digest(module: nn.Module) -> str:
    """A hash of every parameter and buffer: the identity of the weights, however they were loaded."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")  # no copy: a buffer
    return digest.hexdigest()


def file_identity(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of each file: a changed or replaced image changes the key."""
    out = []
    for path in paths:
        stat = os.stat(path)
        out.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    return out


class FeatureCache:
    """Builds and loads cached features for one backbone; one ``.npy`` file per split and key."""

    def __init__(
        self,
        directory: str | Path,
        backbone: nn.Module,
        identity: dict[str, Any],
        bf16: bool | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        self.directory = Path(directory).expanduser()
        self.backbone = backbone
        self.identity = identity
        self.bf16 = bf16
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._weights: str | None = None
        self.reused: set[Path] = set()
        self.built: set[Path] = set()

    def report(self) -> str:
        """For the run summary: how many cache files this run computed and how many it reused."""
        return f"{len(self.built)} built, {len(self.reused - self.built)} reused ({self.directory})"

    def path(self, split: str, files: Sequence[str], labels: Sequence[int], transform: dict[str, Any],
             views: int, seed: int, device: torch.device) -> Path:  # fmt: skip
        if self._weights is None:
            self._weights = weights_digest(self.backbone)
        key = {
            "backbone": self.identity,
            "weights": self._weights,
            "transform": transform,
            "views": views,
            "seed": seed,
            "dtype": "bfloat16" if use_bf16(self.bf16, device) else "float32",
            "files": file_identity(files),
            "labels": list(labels),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return self.directory / f"{split}-{digest}.npy"

    def get(self, split: str, images: Dataset, files: Sequence[str], labels: Sequence[int],
            transform: dict[str, Any], views: int = 1, seed: int = 0,
            device: torch.device | None = None) -> CachedFeatures:  # fmt: skip
        """The cached features of ``images`` (a dataset of (image tensor, label), or None for an
        image skipped as unreadable), computing and storing them first when no whole file has
        this key. One process per key computes; others with the same key wait, then read."""
        device = device or torch.device("cpu")
        path = self.path(split, files, labels, transform, views, seed, device)
        with contextlib.suppress(DamagedCacheFile):  # checked again under the lock, then rebuilt
            if (array := read_features(path, views, len(labels))) is not None:
                return self._reuse(path, split, array, labels)
        with key_lock(path) as locked:
            try:
                array = read_features(path, views, len(labels))  # another process may have built it
            except DamagedCacheFile as exc:
                log.warning("Feature cache file %s is damaged (%s): rebuilding it", path, exc)
                array = None
            if array is not None:
                return self._reuse(path, split, array, labels)
            if locked:
                remove_stale_temporaries(path)
            built, kept = self._build(path, split, images, files, views, seed, device)
            self.built.add(path)
            if kept is not None:
                return CachedFeatures(torch.from_numpy(built), [labels[i] for i in kept], kept=kept)
            write_features(path, built)
            del built  # read back instead: memory-mapped when large
            array = read_back(path, views, len(labels))
        return CachedFeatures(self._load(path, array), labels)

    def _reuse(self, path: Path, split: str, array: np.ndarray, labels: Sequence[int]) -> CachedFeatures:
        log.info("Feature cache hit for %s (%d images): %s", split, len(labels), path)
        self.reused.add(path)
        return CachedFeatures(self._load(path, array), labels)

    def _build(self, path: Path, split: str, images: Dataset, files: Sequence[str], views: int, seed: int,
               device: torch.device) -> tuple[np.ndarray, list[int] | None]:  # fmt: skip
        """``views`` x images x features of the images not skipped, and which those are (None:
        all). Raises :class:`FeatureCacheError` on non-finite features, so they are never stored."""
        from tqdm.auto import tqdm

        bf16 = use_bf16(self.bf16, device)
        log.info(
            "Caching %s features: %d view(s) of %d images, %s, to %s",
            split, views, len(images), "bf16" if bf16 else "float32", path,  # type: ignore[arg-type]
        )  # fmt: skip
        backbone_device = next(self.backbone.parameters()).device
        self.backbone.to(device)
        chunks: list[tuple[list[int], list[torch.Tensor]]] = []  # per view: positions present, features
        try:
            with fast_inference(self.backbone, device, bf16) as forward:
                for view in range(views):
                    generator = torch.Generator().manual_seed(seed + view)
                    loader = DataLoader(
                        images, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                        generator=generator, worker_init_fn=partial(_seed_worker, seed + view),
                        collate_fn=collate_present,  # an image skipped as unreadable leaves with its label
                    )  # fmt: skip
                    desc = f"Caching {split} features" + (f" (view {view + 1}/{views})" if views > 1 else "")
                    with torch.random.fork_rng(devices=[]):  # the run's own random stream stays as it was
                        torch.manual_seed(seed + view)  # the augmentations of view `view` (no workers)
                        batches = [
                            forward(b[0]).cpu() for b in tqdm(loader, desc=desc, leave=False) if b is not None
                        ]
                    chunks.append((kept_positions(images), batches))
        finally:
            self.backbone.to(backbone_device)
        kept = kept_positions(images)  # a file may break in a later view: keep what every view has
        if not kept:
            raise DataError(
                f"Every image of the {split} split was skipped as unreadable: is the folder still there?"
            )
        views_out = []
        for present, batches in chunks:
            features = torch.cat(batches)
            if len(features) != len(present):
                raise RuntimeError(
                    f"{split}: {len(present) - len(features)} samples left out without a skip_mask mark"
                )
            if len(present) != len(kept):
                features = features[torch.as_tensor(np.searchsorted(present, kept))]
            views_out.append(features)
        array = torch.stack(views_out).numpy()
        check_finite(array, split, [files[i] for i in kept], self.backbone, bf16)
        if len(kept) == len(files):
            return array, None
        log.warning(
            "%d of %d %s images were skipped as unreadable: their features are left out, and this "
            "partial result is not stored in %s", len(files) - len(kept), len(files), split, self.directory,
        )  # fmt: skip
        return array, kept

    @staticmethod
    def _load(path: Path, array: np.ndarray) -> torch.Tensor:
        """``array`` (memory-mapped from ``path``) in memory, or left mapped when it is large."""
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = 0
        if available and array.nbytes < IN_MEMORY_SHARE * available:
            return torch.from_numpy(np.array(array))  # a writable copy in memory
        log.info("Feature cache %s (%.1f GB) is memory-mapped", path, array.nbytes / 1e9)
        return torch.from_numpy(array)  # read-only mapping: pages load on demand


def check_finite(
    array: np.ndarray, split: str, files: Sequence[str], backbone: nn.Module, bf16: bool
) -> None:
    """Stop, naming the likely cause and the fix, when the backbone gave NaN or inf features."""
    bad = np.flatnonzero(~np.isfinite(array).all(axis=(0, 2)))
    if not len(bad):
        return
    broken = [name for name, t in backbone.state_dict().items()
              if t.is_floating_point() and not torch.isfinite(t).all()]  # fmt: skip
    if broken:
        cause = (f"Its weights hold NaN or inf ({', '.join(broken[:3])}): the checkpoint or weights file "
                 "is broken; get it again, or point model.weights at a good one.")  # fmt: skip
    elif bf16:
        cause = ("Likely a bf16 overflow: set strategy.bf16=false for float32 features (if it persists, "
                 "check the weights, model.weights).")  # fmt: skip
    else:
        cause = ("Its activations overflow float32 on these images: check the weights (model.weights) "
                 "and the preprocessing (normalization).")  # fmt: skip
    examples = ", ".join(files[i] for i in bad[:3])
    raise FeatureCacheError(
        f"The backbone gave NaN or infinite features for {len(bad)} of {len(files)} {split} images "
        f"(e.g. {examples}); nothing was cached. {cause}"
    )


def _seed_worker(seed: int, worker_id: int) -> None:
    torch.manual_seed(seed * 1000 + worker_id)
