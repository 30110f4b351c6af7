"""Features of a frozen backbone, computed once per image and stored on disk.

Feature extraction trains only the head, so the backbone's output for an image never changes:
running the backbone every epoch repeats the same work. The cache runs it once (``views`` times
per training image when augmenting) and the head trains on the stored tensors.

A cache file is named by a key over everything its numbers depend on: the backbone's weights
(hashed), the preprocessing and augmentation, the number of views and their seed, the
precision, and every image file (path, size, modification time) with its label. Any change
means another key, so a stale cache is never read; runs and sweep jobs with the same key share
one file. Files are written to a temporary name and renamed, so a concurrent reader never sees
half a file.

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
import tempfile
from collections.abc import Callable, Iterator, Sequence
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

# Above this share of the available memory a cache is memory-mapped instead of loaded.
IN_MEMORY_SHARE = 0.25


@cache
def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bfloat16 matrix instructions that make bf16 autocast pay on a CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(choice: bool | None, device: torch.device) -> bool:
    """``choice`` when set; None: bf16 where the hardware pays for it (GPUs with bf16, CPUs with
    AVX-512 BF16 or AMX)."""
    if choice is not None:
        return bool(choice)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def is_convolutional(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def infer_features(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, bf16: bool, channels_last: bool
) -> torch.Tensor:
    """A frozen backbone's forward pass as pure inference: no autograd, channels_last when asked,
    bf16 autocast when ``bf16``; float32 features come out (head, loss and optimizer stay fp32)."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(images.device.type, torch.bfloat16, enabled=bf16):
        return forward(images).float()


@contextlib.contextmanager
def fast_inference(backbone: nn.Module, device: torch.device, bf16: bool) -> Iterator[Callable]:
    """The backbone as a function of a batch on any device, in eval mode, through
    :func:`infer_features` (channels_last for convolutional networks)."""
    was_training = backbone.training
    backbone.eval()
    channels_last = is_convolutional(backbone)

    def forward(images: torch.Tensor) -> torch.Tensor:
        return infer_features(backbone, images.to(device, non_blocking=True), bf16, channels_last)

    try:
        yield forward
    finally:
        backbone.train(was_training)


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


class CachedFeatures(Dataset):
    """(feature vector, label) pairs; with several views, :meth:`set_epoch` picks which one."""

    def __init__(self, features: torch.Tensor, labels: Sequence[int]) -> None:
        if features.ndim != 3 or features.shape[1] != len(labels):
            raise ValueError(f"features of shape {tuple(features.shape)} do not match {len(labels)} labels")
        self.features = features
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.view = 0

    @property
    def views(self) -> int:
        return int(self.features.shape[0])

    def set_epoch(self, epoch: int) -> None:
        self.view = epoch % self.views

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[self.view, index], self.labels[index]


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
        """The cached features of ``images`` (a dataset of (image tensor, label)), computing and
        storing them first when no file has this key."""
        device = device or torch.device("cpu")
        path = self.path(split, files, labels, transform, views, seed, device)
        if path.is_file():
            log.info("Feature cache hit for %s (%d images): %s", split, len(labels), path)
            self.reused.add(path)
        else:
            self._build(path, split, images, views, seed, device)
            self.built.add(path)
        return CachedFeatures(self._load(path), labels)

    def _build(
        self, path: Path, split: str, images: Dataset, views: int, seed: int, device: torch.device
    ) -> None:
        from tqdm.auto import tqdm

        bf16 = use_bf16(self.bf16, device)
        log.info(
            "Caching %s features: %d view(s) of %d images, %s, to %s",
            split, views, len(images), "bf16" if bf16 else "float32", path,  # type: ignore[arg-type]
        )  # fmt: skip
        backbone_device = next(self.backbone.parameters()).device
        self.backbone.to(device)
        chunks: list[torch.Tensor] = []
        try:
            with fast_inference(self.backbone, device, bf16) as forward:
                for view in range(views):
                    generator = torch.Generator().manual_seed(seed + view)
                    loader = DataLoader(
                        images, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                        generator=generator, worker_init_fn=partial(_seed_worker, seed + view),
                    )  # fmt: skip
                    desc = f"Caching {split} features" + (f" (view {view + 1}/{views})" if views > 1 else "")
                    with torch.random.fork_rng(devices=[]):  # the run's own random stream stays as it was
                        torch.manual_seed(seed + view)  # the augmentations of view `view` (no workers)
                        batches = [forward(x).cpu() for x, _ in tqdm(loader, desc=desc, leave=False)]
                    chunks.append(torch.cat(batches))
        finally:
            self.backbone.to(backbone_device)
        array = torch.stack(chunks).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npy", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as f:
                np.save(f, array)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @staticmethod
    def _load(path: Path) -> torch.Tensor:
        array = np.load(path, mmap_mode="r")
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = 0
        if available and array.nbytes < IN_MEMORY_SHARE * available:
            return torch.from_numpy(np.array(array))  # a writable copy in memory
        log.info("Feature cache %s (%.1f GB) is memory-mapped", path, array.nbytes / 1e9)
        return torch.from_numpy(array)  # read-only mapping: pages load on demand


def _seed_worker(seed: int, worker_id: int) -> None:
    torch.manual_seed(seed * 1000 + worker_id)
