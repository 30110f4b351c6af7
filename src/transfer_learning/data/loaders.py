"""Data loaders for the data module: samplers that count every evaluation sample once under
DDP, class-balanced sampling (``data.balance=weighted_sampler``), and seeded workers that
resume exactly."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from transfer_learning.data.skipping import collate_present
from transfer_learning.errors import ConfigError
from transfer_learning.features import CACHED_BATCH_MAX, CACHED_MIN_STEPS, CachedFeatures


def check_batch_size(batch_size: Any) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"data.batch_size={batch_size}: the batch size (per device) must be 1 or more.")
    return batch_size


def cached_batch_size(setting: int | str | None, rows: int, batch_size: int) -> int:
    """The training batch on cached features: ``setting`` (``auto``: ``batch_size`` or more, up
    to :data:`CACHED_BATCH_MAX` rows, at least :data:`CACHED_MIN_STEPS` steps per epoch of
    ``rows``; None: ``batch_size``)."""
    if setting is None:
        return batch_size
    if setting == "auto":
        return max(batch_size, min(CACHED_BATCH_MAX, rows // CACHED_MIN_STEPS))
    return int(setting)


def worker_count(num_workers: int | str) -> int:
    """``data.num_workers``: a number, or "auto" (one per core this process may use, at most 8)."""
    if num_workers == "auto":
        return min(8, len(os.sched_getaffinity(0)))
    if not str(num_workers).lstrip("-").isdigit() or int(num_workers) < 0:
        raise ConfigError(
            f"data.num_workers={num_workers}: use 0 (load in the main process), a positive number "
            "of loader processes, or auto (one per core, at most 8)."
        )
    return int(num_workers)


def balanced_sampler(targets: Sequence[Any], num_classes: int) -> WeightedRandomSampler:
    """Each class drawn about equally often (with replacement). Multi-label: an image weighs
    the inverse frequency of its rarest label. Under DDP Lightning splits it across processes."""
    labels = [t if isinstance(t, tuple) else (t,) for t in targets]
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for row in labels:
        counts[list(row)] += 1
    inverse = 1.0 / counts.clamp(min=1)
    weights = [float(inverse[list(row)].max()) if row else float(inverse.min()) for row in labels]
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True)


def eval_sampler(dataset: Dataset, trainer: L.Trainer | None) -> UnrepeatedDistributedSampler | None:
    """Under DDP, evaluation shards that may differ by one sample: Lightning's DistributedSampler
    would pad them to equal length by repeating samples, and those would be counted twice."""
    if trainer is None or trainer.world_size <= 1:
        return None
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    trainer: L.Trainer | None,
    train: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:

    rank = trainer.global_rank if trainer is not None else 0
    world_size = trainer.world_size if trainer is not None else 1
    per_process = len(dataset) // world_size  # type: ignore[arg-type]
    # Cached features are rows of a tensor: loader workers would only add overhead.
    workers = 0 if isinstance(dataset, CachedFeatures) else num_workers
    if not train:
        sampler = eval_sampler(dataset, trainer)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        # Exact resumes (random_state.RandomState): training workers start afresh each epoch,
        # seeded from the main process's random state, which checkpoints carry; evaluation (no
        # random transforms) keeps its workers and seeds them from its own generator, taking
        # nothing from that state.
        persistent_workers=workers > 0 and not train,
        generator=None if train else torch.Generator().manual_seed(0),
        # Seeded as Lightning seeds workers; a SIGTERM to every process (SLURM) leaves the
        # stopping to the main process.
        worker_init_fn=partial(loader_worker_init, rank=rank, main=os.getpid()) if workers else None,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_present,  # a file skipped mid-run leaves with its label
        # A last batch of one sample breaks BatchNorm in training mode.
        drop_last=train and per_process > batch_size,
    )


def loader_worker_init(worker_id: int, rank: int = 0, main: int | None = None) -> None:
    """``worker_init_fn`` of the data module's loaders, run in each worker process: Lightning's
    seeding of the worker (as ``seed_everything(workers=True)`` asks for), and SIGTERM from
    anyone but the main process ignored. SLURM signals every process of a job: a worker ended by
    it would end the run with a DataLoader error before the main process, told by the same
    signal, saves its checkpoint and stops the workers itself (its SIGTERM still ends them)."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank)
    # Ctrl-C in a terminal reaches every process of the foreground group: the main process
    # stops the run (SaveOnPreemption), a worker that died of it would end the run with an error.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS, Windows: workers keep torch's handling
        return
    main = main or os.getppid()  # the process that made the loader (a forkserver is not it)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # from here on, only this waits for it

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != main:
            pass
        os._exit(0)  # what torch's own handler does when the main process sends it

    threading.Thread(target=wait, name="sigterm-from-main-only", daemon=True).start()
