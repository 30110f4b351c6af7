"""The data module: one listing from a data source, checked, split, transformed and loaded.

The path flows one way: the source (``data.source``) lists images, targets, splits and class
names (:mod:`transfer_learning.data.sources`); the data module checks the files
(:mod:`~transfer_learning.data.scan`), splits them when the listing does not
(:mod:`~transfer_learning.data.splits`), checks the splits (:mod:`~transfer_learning.data.checks`),
and serves images, or cached backbone features when the build path asks for them, under the
preprocessing the network hands over. Nothing here depends on which source listed the files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from transfer_learning.data import checks
from transfer_learning.data.cached_splits import CachedSplits
from transfer_learning.data.datasets import ListedImages, samples
from transfer_learning.data.feature_cache import FeatureCache
from transfer_learning.data.loaders import (
    balanced_sampler,
    check_batch_size,
    make_loader,
    worker_count,
)
from transfer_learning.data.scan import check_listing
from transfer_learning.data.skipping import gather_sets, skipped_positions
from transfer_learning.data.sources import Listing, make_source
from transfer_learning.data.sources.base import check_task
from transfer_learning.data.splits import (
    REFIT,
    check_folds,
    check_fractions,
    fold_split,
    split_listing,
)
from transfer_learning.data.transforms import augment_settings, build_transforms
from transfer_learning.errors import ConfigError, DataError
from transfer_learning.features import CachedFeatures
from transfer_learning.preprocessing import Preprocessing

log = logging.getLogger(__name__)

BALANCE = ("none", "weighted_loss", "weighted_sampler")
# Validation/test batches of cached features: rows of a few kB, so a whole split per step.
EVAL_FEATURE_ROWS = 4096


class ImageDataModule(CachedSplits, L.LightningDataModule):
    """Images listed by ``source`` (``data.source``; its own settings are the other ``data.*``
    keys, e.g. ``root`` or ``file``), for ``task`` (None: the source decides). The network
    decides the preprocessing (input size included) and hands it over through
    :meth:`set_preprocessing` before :meth:`setup`."""

    def __init__(
        self,
        source: str = "imagefolder",
        task: str | None = None,
        batch_size: int = 32,
        num_workers: int | str = "auto",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 42,
        augment: Mapping[str, Any] | None = None,
        verify_images: bool = True,
        on_bad_file: str = "error",
        scan_cache_dir: str | None = None,
        drop_duplicates: bool = False,
        balance: str = "none",
        cv_folds: int | None = None,
        cv_fold: int = 0,
        **source_settings: Any,
    ) -> None:
        super().__init__()
        self.source = make_source(source, {k: v for k, v in source_settings.items() if v is not None})
        self.requested_task = check_task(task)
        self.batch_size = check_batch_size(batch_size)
        self.num_workers = worker_count(num_workers)
        self.fractions = check_fractions(val_fraction, test_fraction)
        self.seed = seed
        # k-fold cross-validation (set by the fold loop, cv=K): val is fold cv_fold of cv_folds
        self.cv_folds = check_folds(cv_folds)
        self.cv_fold = int(cv_fold)
        self.augment = augment_settings(augment)
        self.verify = verify_images
        if on_bad_file not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_file={on_bad_file!r}: use error (stop and list them) or skip.")
        self.on_bad_file = on_bad_file
        if balance not in BALANCE:
            raise ConfigError(f"data.balance={balance!r}: use one of {', '.join(BALANCE)}.")
        self.balance = balance
        self.drop_duplicates = bool(drop_duplicates)
        self.scan_cache_dir = Path(scan_cache_dir).expanduser() if scan_cache_dir else None
        self.digests: dict[str, str] = {}  # file -> content hash, from the scan
        self.train_class_counts: list[int] = []
        self.left_out: dict[str, int] = {}  # why -> how many files
        self.skipped: dict[str, set[str]] = {}  # split -> files that broke during the run (skip)
        self.preprocessing: Preprocessing | None = None
        self.feature_cache: FeatureCache | None = None
        self.cache_views, self.cache_seed = 1, 0
        self.cache_batch_size: int | str | None = None
        self.datasets: dict[str, Dataset] = {}
        self.split_files: dict[str, tuple[list[str], list[Any]]] = {}
        self._cached: dict[tuple[int, tuple[str, ...]], dict[str, CachedFeatures]] = {}
        self._warned: set[str] = set()
        self.listing: Listing | None = None

    # -- the listing ------------------------------------------------------------------------

    def describe(self) -> str:
        """The setting that names the data, for messages and the summary."""
        return self.source.describe()

    def prepare_data(self) -> None:
        """The source's preparation (demo data written on first use); cached features, computed
        by one process per node (the others wait for the file, then read it)."""
        self.source.prepare()
        if self.feature_cache is not None and self.preprocessing is not None and not self.datasets:
            self._features()

    def discover(self) -> list[str]:
        """Read and check the listing (files, targets, splits) and return the class names."""
        if self.listing is None:
            self.source.prepare()
            listing = self.source.read(self.requested_task)
            if self.requested_task and listing.task != self.requested_task:
                raise ConfigError(
                    f"task={self.requested_task}, but {self.describe()} holds {listing.task} data."
                )
            listing = check_listing(listing, self.verify, self.on_bad_file, self.scan_cache_dir, self.digests)
            self.left_out.update(listing.left_out)
            # The same files and targets give the same split whatever order the source listed them in.
            order = sorted(
                range(len(listing.files)), key=lambda i: (listing.targets[i], str(listing.files[i]))
            )
            self.listing = listing.subset(order)
        return self.listing.class_names

    @property
    def class_names(self) -> list[str]:
        return self.discover()

    def class_files(self) -> dict[str, list[Path]]:
        """Class name -> the files listed with it (after the checks), in listing order."""
        self.discover()
        assert self.listing is not None
        out: dict[str, list[Path]] = {name: [] for name in self.listing.class_names}
        for file, targets in zip(self.listing.files, self.listing.targets, strict=True):
            for c in targets:
                out[self.listing.class_names[c]].append(file)
        return out

    @property
    def task(self) -> str:
        self.discover()
        assert self.listing is not None
        return self.listing.task

    @property
    def refit(self) -> bool:
        """cv.refit=true's final run: trained on every fold, no validation split."""
        return bool(self.cv_folds) and self.cv_fold == REFIT

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def set_preprocessing(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    # -- datasets ---------------------------------------------------------------------------

    def _split(self) -> dict[str, list[int]]:
        """Listing positions per split: the seeded split, or with cross-validation this fold's."""
        assert self.listing is not None
        if self.cv_folds:
            return fold_split(self.listing, self.fractions, self.seed, self.cv_folds, self.cv_fold)
        return split_listing(self.listing, self.fractions, self.seed)

    def _images(self, positions: Sequence[int], train: bool) -> ListedImages:
        listing = self.listing
        assert listing is not None and self.preprocessing is not None
        multilabel = listing.task == "multilabel"
        pairs = [
            (str(listing.files[i]), tuple(listing.targets[i]) if multilabel else listing.targets[i][0])
            for i in positions
        ]
        transform = build_transforms(self.preprocessing, train, self.augment)
        return ListedImages(pairs, len(listing.class_names), multilabel, transform, self.on_bad_file)

    def eval_datasets(self, augment_train: bool = False) -> dict[str, Dataset]:
        """Every split (train, val, test; test is val itself when there is no test split) as
        images under the evaluation transform (``augment_train``: train augmented), checked for
        leakage and imbalance."""
        if self.preprocessing is None:
            raise RuntimeError("set_preprocessing() must be called before setup(): the backbone decides it")
        self.discover()
        assert self.listing is not None
        indices = self._split()
        datasets: dict[str, Dataset] = {"train": self._images(indices["train"], augment_train)}
        for name in ("val", "test"):
            if indices.get(name):
                datasets[name] = self._images(indices[name], False)
        if self.refit:  # cv.refit=true: every fold trains, the held-out test split tests
            if "test" not in datasets:
                raise DataError(
                    "cv.refit=true trains on every training+validation image, so it needs a test split "
                    "to test on: set data.test_fraction above 0 (or list test images), or drop cv.refit."
                )
        elif "val" not in datasets:
            raise DataError(
                "the validation split is empty: set data.val_fraction above 0 or add validation images."
            )
        if "test" not in datasets:
            log.warning("No test split (none listed and data.test_fraction=0): testing on val.")
            datasets["test"] = datasets["val"]
        checks.check_leakage(
            datasets, self.digests, self.class_names, self.drop_duplicates, self._warn_once, self.left_out
        )
        _, train_targets = samples(datasets["train"])
        self.train_class_counts = checks.class_counts(train_targets, len(self.class_names))
        checks.check_balance(
            self.train_class_counts, self.class_names, self.balance, self.task, self._warn_once
        )
        # Each split's image files and targets, in dataset order (also the cached features' order).
        self.split_files = {name: samples(ds) for name, ds in datasets.items()}
        return datasets

    @property
    def data_warnings(self) -> list[str]:
        """The data checks' warnings so far (leakage, label conflicts, imbalance), sorted."""
        return sorted(self._warned)

    def _warn_once(self, message: str, *args: Any) -> None:
        """A data warning, logged once however often the splits are rebuilt."""
        text = message % args
        if text not in self._warned:
            self._warned.add(text)
            log.warning(text)

    def loss_weights(self) -> torch.Tensor | None:
        """The training loss's class weights for ``data.balance=weighted_loss``, else None."""
        if self.balance != "weighted_loss":
            return None
        if not self.train_class_counts:
            self.eval_datasets()
        return checks.loss_weights(
            self.train_class_counts, len(self.split_files["train"][0]), self.multilabel
        )

    # -- files that broke during the run -----------------------------------------------------

    def _note_skipped(self, split: str, files: Sequence[str], positions: Sequence[int]) -> None:
        self.skipped.setdefault(split, set()).update(files[i] for i in positions)

    def count_skipped(self) -> dict[str, int]:
        """Files that could not be read during the run (data.on_bad_file=skip) and were left out
        with their labels, per split, over every process; also entered in :attr:`left_out`."""
        for name, dataset in self.datasets.items():
            positions = skipped_positions(dataset)
            if positions and not (name == "test" and dataset is self.datasets.get("val")):
                self._note_skipped(name, samples(dataset)[0], positions)
        counts = {name: len(files) for name, files in gather_sets(self.skipped).items() if files}
        for name, n in counts.items():
            self.left_out[f"unreadable during the run ({name})"] = n
        return counts

    # -- Lightning hooks ----------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.datasets = (
            self._features() if self.feature_cache is not None else self.eval_datasets(augment_train=True)
        )

    def split_sizes(self) -> dict[str, int]:
        return {name: len(ds) for name, ds in self.datasets.items()}  # type: ignore[arg-type]

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.balance == "weighted_sampler":
            sampler = balanced_sampler(self.split_files["train"][1], len(self.class_names))
        processes = self.trainer.world_size if self.trainer is not None else 1
        batch = self.train_batch_size(processes)
        return make_loader(self.datasets["train"], batch, self.num_workers, self.trainer, True, sampler)

    def _eval_loader(self, name: str) -> DataLoader:
        # Evaluating cached features is one matrix product per batch: a batch size only costs steps.
        dataset = self.datasets[name]
        batch = (
            max(self.batch_size, EVAL_FEATURE_ROWS)
            if isinstance(dataset, CachedFeatures)
            else self.batch_size
        )
        return make_loader(dataset, batch, self.num_workers, self.trainer)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # cv.refit=true has no validation split: Lightning validates nothing for an empty list
        return self._eval_loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class ImageFolderDataModule(ImageDataModule):
    """Class folders under ``root`` (``data.source=imagefolder``): the name configs written
    before data sources existed use, and the shortest way to build one in Python."""

    def __init__(self, root: str | Path, **settings: Any) -> None:
        settings.setdefault("source", "imagefolder")
        super().__init__(root=root, **settings)


__all__ = ["ImageDataModule", "ImageFolderDataModule", "Subset", "build_transforms", "samples"]
