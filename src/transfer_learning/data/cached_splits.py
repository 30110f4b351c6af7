"""The data module's cached-feature side: training on a frozen backbone's stored features
instead of images (:class:`~transfer_learning.data.feature_cache.FeatureCache`), the training
batch that suits them, and cross-validation's one cache for every fold. Mixed into
:class:`~transfer_learning.data.datamodule.ImageDataModule`, whose state it reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from transfer_learning.data.datasets import multi_hot, samples
from transfer_learning.data.feature_cache import FeatureCache
from transfer_learning.data.loaders import cached_batch_size
from transfer_learning.data.splits import fold_numbers
from transfer_learning.features import CachedFeatures, check_cached_batch_size

if TYPE_CHECKING:
    from transfer_learning.data.datasets import ListedImages
    from transfer_learning.data.sources import Listing
    from transfer_learning.preprocessing import Preprocessing


class CachedSplits:
    """Cached features of the splits (see the module doc)."""

    # The data module's own state (set in its __init__ and setup) and methods this side uses.
    feature_cache: FeatureCache | None
    cache_views: int
    cache_seed: int
    cache_batch_size: int | str | None
    batch_size: int
    listing: Listing | None
    preprocessing: Preprocessing | None
    augment: dict[str, Any]
    cv_folds: int | None
    fractions: dict[str, float]
    seed: int
    split_files: dict[str, tuple[list[str], list[Any]]]
    _cached: dict[tuple[int, tuple[str, ...]], dict[str, CachedFeatures]]

    if TYPE_CHECKING:
        trainer: Any

        @property
        def class_names(self) -> list[str]: ...

        @property
        def multilabel(self) -> bool: ...

        def discover(self) -> list[str]: ...

        def _split(self) -> dict[str, list[int]]: ...

        def _images(self, positions: Sequence[int], train: bool) -> ListedImages: ...

        def eval_datasets(self, augment_train: bool = False) -> dict[str, Dataset]: ...

        def _note_skipped(self, split: str, files: Sequence[str], positions: Sequence[int]) -> None: ...

    def use_feature_cache(
        self, cache: FeatureCache, views: int = 1, seed: int = 0, batch_size: int | str | None = None
    ) -> None:
        """Serve cached backbone features instead of images: ``views`` augmented views of each
        training image (1: the exact evaluation transform), one exact view of val and test;
        training batches of ``batch_size`` rows (``auto``: :func:`loaders.cached_batch_size`;
        None: ``data.batch_size``)."""
        self.feature_cache, self.cache_views, self.cache_seed = cache, views, seed
        self.cache_batch_size = check_cached_batch_size(batch_size)

    def train_batch_size(self, processes: int = 1) -> int:
        """The training batch per process: ``data.batch_size`` for images; for cached features,
        what ``strategy.cached_batch_size`` makes of it for this split's size."""
        if self.feature_cache is None:
            return self.batch_size
        self.discover()  # the split's size, before any dataset exists (the run's summary asks first)
        assert self.listing is not None
        rows = len(self._split()["train"]) // max(processes, 1)
        return cached_batch_size(self.cache_batch_size, rows, self.batch_size)

    def cached_features(self, cache: FeatureCache, splits: Sequence[str]) -> dict[str, CachedFeatures]:
        """Exact cached features (evaluation transform) of ``splits`` (computed first where no
        cache file matches), e.g. for a strategy's step before fit."""
        key = (id(cache), tuple(splits))
        if key not in self._cached:
            images = self.eval_datasets()
            # (cv.refit=true's run has no val split: a strategy that asks for it gets none)
            self._cached[key] = self._cache(cache, {k: images[k] for k in splits if k in images}, views=1)
        return self._cached[key]

    def _cache(
        self, cache: FeatureCache, images: dict[str, Dataset], views: int
    ) -> dict[str, CachedFeatures]:
        """Every split of ``images`` as cached features, computed first where no file matches."""
        assert self.preprocessing is not None
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        exact = {"eval": self.preprocessing.to_dict()}
        train = {"train": self.preprocessing.to_dict(), "augment": self.augment}
        out: dict[str, CachedFeatures] = {}
        if self.cv_folds and views == 1:  # every fold's train and val: rows of one cache of them all
            out.update(self._fold_features(cache, images, exact, device))
        for name, dataset in images.items():
            if name in out:
                continue
            if name == "test" and dataset is images.get("val"):
                out[name] = out["val"]
                continue
            files, targets = samples(dataset)
            labels: Sequence[Any] = multi_hot(targets, len(self.class_names)) if self.multilabel else targets
            augmented = name == "train" and views > 1
            features = cache.get(
                name, dataset, files, labels, transform=train if augmented else exact,
                views=views if augmented else 1, seed=self.cache_seed, device=device,
            )  # fmt: skip
            if features.kept is not None:  # files that broke while caching: left out with their labels
                self._note_skipped(name, files, sorted(set(range(len(files))) - set(features.kept)))
                self.split_files[name] = (
                    [files[i] for i in features.kept],
                    [targets[i] for i in features.kept],
                )
            out[name] = features
        return out

    def _fold_features(
        self, cache: FeatureCache, images: dict[str, Dataset], exact: dict[str, Any], device: torch.device
    ) -> dict[str, CachedFeatures]:
        """Cross-validation: the features of all training+validation images, cached once under
        one key (the same for every fold), and this fold's train and val as rows of them; empty
        where an image broke while caching (each split is then cached on its own)."""
        assert self.listing is not None
        numbers = fold_numbers(self.listing, self.fractions, self.seed, self.cv_folds or 0)
        pool = self._images(sorted(numbers), False)
        files, targets = samples(pool)
        labels: Sequence[Any] = multi_hot(targets, len(self.class_names)) if self.multilabel else targets
        features = cache.get("trainval", pool, files, labels, transform=exact, views=1, seed=0, device=device)
        if features.kept is not None:
            return {}
        row = {file: i for i, file in enumerate(files)}
        out = {}
        for name in ("train", "val") if "val" in images else ("train",):
            chosen = [row[f] for f in samples(images[name])[0]]
            out[name] = CachedFeatures(features.features[:, chosen], [labels[i] for i in chosen])
        return out

    def _features(self) -> dict[str, Dataset]:
        assert self.feature_cache is not None
        images = self.eval_datasets(augment_train=self.cache_views > 1)
        features = self._cache(self.feature_cache, images, self.cache_views)
        if features["train"].views > 1:
            features["train"].epoch_of = self._epoch  # epoch e reads view e mod views
        return dict(features)

    def _epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0
