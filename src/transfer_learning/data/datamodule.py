"""ImageFolder data: discovery and validation, seeded stratified splits, transforms, loaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, WeightedRandomSampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from transfer_learning.data.demo import generate_shapes
from transfer_learning.data.feature_cache import CachedFeatures, FeatureCache
from transfer_learning.data.images import (
    Listing,
    describe_bad,
    identity,
    is_hidden,
    list_images,
    load_rgb,
    scan_cache_file,
    scan_images,
)
from transfer_learning.data.skipping import SkipMask, collate_present, skipped_positions
from transfer_learning.errors import ConfigError, DataError
from transfer_learning.model.preprocessing import Preprocessing

log = logging.getLogger(__name__)

BALANCE = ("none", "weighted_loss", "weighted_sampler")
# A training set whose largest class has this many times the images of its smallest is imbalanced.
IMBALANCE_RATIO = 3.0
SPLIT_ALIASES = {"val": ("val", "valid", "validation"), "test": ("test",), "train": ("train",)}
DEFAULT_AUGMENT: dict[str, Any] = {
    "enabled": True,
    "scale": (0.35, 1.0),
    "hflip": 0.5,
    "trivial_augment": False,
}


def class_folders(
    folder: Path,
    seen: set[tuple[int, int]] | None = None,
    boundaries: set[tuple[int, int]] | None = None,
    problems: list[str] | None = None,
) -> tuple[dict[str, list[Path]], Listing]:
    """Class name -> image files (each real file once, hidden entries ignored), and what was
    left out; clear errors for the usual mistakes. With a ``problems`` list, class folders
    without images are added to it (to be reported with the scan's findings, in one message)
    instead of raised at once; such a class maps to no files."""
    try:
        entries = sorted(p for p in folder.iterdir() if not is_hidden(p.name))
    except PermissionError as exc:
        raise DataError(
            f"cannot read folder {folder}: permission denied. Fix its permissions (chmod)."
        ) from exc
    classes = [p for p in entries if p.is_dir()]
    if not classes:
        raise DataError(
            f"{folder} has no class folders. Expected ImageFolder layout: "
            f"{folder}/<class>/<image>.jpg, or {folder}/train/<class>/..., {folder}/val/<class>/..."
        )
    seen = seen if seen is not None else set()
    fences = {identity(folder), *(identity(c) for c in classes), *(boundaries or set())}
    listing = Listing()
    found = {}
    for c in classes:
        start = len(listing.files)
        list_images(c, seen, listing, boundaries=fences - {identity(c)})
        found[c.name] = sorted(listing.files[start:])
    if listing.unreadable:
        raise DataError(
            f"cannot read folder(s) {', '.join(listing.unreadable)}: permission denied. Fix their "
            "permissions (chmod -R u+rX) or move them out of data.root."
        )
    empty = [str(folder / name) for name, files in found.items() if not files]
    if empty:
        message = (
            f"class folder(s) with no images: {', '.join(empty)}. Add images "
            f"({', '.join(IMG_EXTENSIONS)}) or remove the folder."
            + (f" ({'; '.join(listing.notes())})" if listing.notes() else "")
        )
        if problems is None:
            raise DataError(message)
        problems.append(message)
    return found, listing


def stratified_split(
    labels: Sequence[int], fractions: Mapping[str, float], seed: int, class_names: Sequence[str]
) -> dict[str, list[int]]:
    """Indices per split; each class is shuffled with ``seed`` and cut by ``fractions``."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, list[int]] = {"train": [], **{name: [] for name in fractions}}
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    for label, indices in sorted(by_class.items()):
        order = [indices[i] for i in torch.randperm(len(indices), generator=generator)]
        start = 0
        for name, fraction in fractions.items():
            count = max(1, round(len(order) * fraction)) if fraction > 0 else 0
            out[name] += order[start : start + count]
            start += count
        if start >= len(order):
            raise DataError(
                f"class {class_names[label]!r} has only {len(order)} image(s): too few to split "
                f"into train and {', '.join(fractions)}. Add images or lower the split fractions."
            )
        out["train"] += order[start:]
    return {name: sorted(indices) for name, indices in out.items()}


def build_transforms(p: Preprocessing, train: bool, augment: Mapping[str, Any]) -> T.Compose:
    interpolation = InterpolationMode(p.interpolation)
    finish = [T.ToDtype(torch.float32, scale=True), T.Normalize(p.mean, p.std)]
    if not train or not augment.get("enabled", True):
        return T.Compose(
            [T.ToImage(), T.Resize(p.resize_size, interpolation, antialias=True),
             T.CenterCrop(p.crop_size), *finish]
        )  # fmt: skip
    steps: list[Any] = [
        T.ToImage(),
        T.RandomResizedCrop(p.crop_size, scale=tuple(augment["scale"]),
                            interpolation=interpolation, antialias=True),
    ]  # fmt: skip
    if augment["hflip"] > 0:
        steps.append(T.RandomHorizontalFlip(augment["hflip"]))
    if augment["trivial_augment"]:
        # On tensors its rotations and shears support nearest and bilinear only (not bicubic).
        steps.append(T.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    return T.Compose(steps + finish)


class ClassFolder(ImageFolder):
    """An ImageFolder over the files discovery found and the scan passed (hidden entries and
    symlink loops left out, each real file once), with the same classes and label order in
    every split. A file that cannot be read any more during training follows
    ``data.on_bad_file``: a clear error, or ``None`` in its place (sample and label left out
    together by :func:`collate_present`; :attr:`skip_mask` remembers it for the rest of the run)."""

    def __init__(
        self, root: str, files: Mapping[str, Sequence[Path]], on_bad_file: str = "error", **kwargs: Any
    ) -> None:
        self._files = {name: list(paths) for name, paths in files.items()}
        self.on_bad_file = on_bad_file
        super().__init__(root, **kwargs)
        self.skip_mask = SkipMask(len(self.samples))

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        names = list(self._files)
        return names, {name: i for i, name in enumerate(names)}

    def make_dataset(
        self, directory: str | Path, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        return [(str(path), class_to_idx[name]) for name, paths in self._files.items() for path in paths]

    def __getitem__(self, index: int) -> Any:
        if index in self.skip_mask:
            return None
        try:
            return super().__getitem__(index)
        except DataError as exc:
            if self.on_bad_file != "skip":
                raise DataError(
                    f"{exc} (it passed the check before training: changed since?). Replace it, "
                    "or set data.on_bad_file=skip to train on without such files."
                ) from None
            self.skip_mask.mark(index)
            log.warning("Skipping %s (left out with its label for the rest of the run)", exc)
            return None


class ImageFolderDataModule(L.LightningDataModule):
    """Images from ``root`` in ImageFolder layout.

    Either ``root/train``, ``root/val`` (or ``valid``) and optionally ``root/test``, or one
    folder of class folders that is split with a seeded, stratified split. Class names come
    from the folder names. ``generate`` (demo data) writes a data set to ``root`` first if
    it does not exist yet. The network decides the preprocessing (input size included) and
    hands it over through :meth:`set_preprocessing` before :meth:`setup`.
    """

    def __init__(
        self,
        root: str,
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
        generate: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}: the batch size (per device) must be 1 or more.")
        if num_workers != "auto" and (not str(num_workers).lstrip("-").isdigit() or int(num_workers) < 0):
            raise ConfigError(
                f"data.num_workers={num_workers}: use 0 (load in the main process), a positive number "
                "of loader processes, or auto (one per core, at most 8)."
            )
        self.batch_size = batch_size
        # "auto": one loader worker per core this process may use, at most 8.
        self.num_workers = min(8, len(os.sched_getaffinity(0))) if num_workers == "auto" else int(num_workers)
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ConfigError(
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: each must be "
                "in [0, 1) and together below 1."
            )
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.seed = seed
        unknown = set(augment or {}) - set(DEFAULT_AUGMENT)
        if unknown:
            raise ConfigError(
                f"unknown data.augment keys {sorted(unknown)}; known: {sorted(DEFAULT_AUGMENT)}"
            )
        self.augment = {**DEFAULT_AUGMENT, **(augment or {})}
        self.verify = verify_images
        if on_bad_file not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_file={on_bad_file!r}: use error (stop and list them) or skip.")
        self.on_bad_file = on_bad_file
        if balance not in BALANCE:
            raise ConfigError(f"data.balance={balance!r}: use one of {', '.join(BALANCE)}.")
        self.balance = balance
        self.drop_duplicates = bool(drop_duplicates)
        self.digests: dict[str, str] = {}  # file -> content hash, from the scan
        self.train_class_counts: list[int] = []
        self.scan_cache_dir = Path(scan_cache_dir).expanduser() if scan_cache_dir else None
        self.files: dict[Path, dict[str, list[Path]]] = {}  # split folder -> class -> files
        self.left_out: dict[str, int] = {}  # why -> how many files
        self.skipped: dict[str, set[str]] = {}  # split -> files that broke during the run (skip)
        self.generate = dict(generate) if generate else None
        self.preprocessing: Preprocessing | None = None
        self.feature_cache: FeatureCache | None = None
        self.probe_cache: FeatureCache | None = None
        self._probe: dict[str, Dataset] = {}
        self._warned: set[str] = set()
        self.cache_views, self.cache_seed = 1, 0
        self.datasets: dict[str, Dataset] = {}
        self.split_files: dict[str, tuple[list[str], list[int]]] = {}
        self._layout: dict[str, Path] | None = None
        self._classes: list[str] | None = None

    # -- discovery -----------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate the demo data set, but only into the folder it was configured for (a
        mistyped data.root must fail, not quietly become demo data); compute cached features."""
        if self.generate is not None and not self.root.exists():
            spec = dict(self.generate)
            target = Path(spec.pop("root", self.root)).expanduser()
            if target.absolute() == self.root.absolute():
                log.info("Generating the demo data set in %s", self.root)
                generate_shapes(self.root, **spec)
        # One process per node computes the cached features; the others wait, then load them.
        if self.feature_cache is not None and self.preprocessing is not None and not self.datasets:
            self._features()
        if self.probe_cache is not None and self.preprocessing is not None:
            self.probe_features()

    def _find_layout(self) -> dict[str, Path]:
        if not self.root.is_dir():
            raise DataError(
                f"data.root={self.root} does not exist or is not a folder. Point data.root at an "
                "ImageFolder tree (<root>/<class>/<image> or <root>/train|val/<class>/<image>), "
                "or use data=demo."
            )
        layout = {}
        for split, names in SPLIT_ALIASES.items():
            for name in names:
                if (self.root / name).is_dir():
                    layout[split] = self.root / name
                    break
        if layout and "train" not in layout:
            raise DataError(
                f"{self.root} has {', '.join(p.name for p in layout.values())}/ but no train/ folder."
            )
        return layout or {"all": self.root}

    def discover(self) -> list[str]:
        """Validate the folder tree (and images) and return the class names."""
        if self._classes is not None:
            return self._classes
        self.prepare_data()
        layout = self._find_layout()
        seen: set[tuple[int, int]] = set()
        fences = {identity(self.root), *(identity(folder) for folder in layout.values())}
        problems: list[str] = []  # empty class folders: reported together with the scan's bad files
        walked = {split: class_folders(folder, seen, fences, problems) for split, folder in layout.items()}
        found = {split: classes for split, (classes, _) in walked.items()}
        listing = Listing.merged(part for _, part in walked.values())
        for note in listing.notes():
            log.warning("%s: %s", self.root, note)
        if listing.other_extensions:
            self.left_out["unsupported extension"] = sum(listing.other_extensions.values())
        if listing.special:
            self.left_out["not a regular file"] = len(listing.special)
        reference = next(iter(found))
        names = list(found[reference])
        for split, classes in found.items():
            if list(classes) != names:
                only_ref = sorted(set(names) - set(classes))
                only_here = sorted(set(classes) - set(names))
                raise DataError(
                    f"{layout[split]} and {layout[reference]} have different class folders "
                    f"(only in {reference}: {only_ref}; only in {split}: {only_here}). "
                    "Every split needs the same classes."
                )
        if len(names) < 2:
            raise DataError(
                f"{layout[reference]} has one class folder ({names[0]}); a classifier needs two or more."
            )
        if self.verify:
            found = self._scan(found, problems)
        elif problems:
            raise DataError("\n".join(problems))
        self.files = {layout[split]: classes for split, classes in found.items()}
        self._layout, self._classes = layout, names
        return names

    def _scan(
        self, splits: dict[str, dict[str, list[Path]]], problems: Sequence[str] = ()
    ) -> dict[str, dict[str, list[Path]]]:
        """Decode every image of every split (split -> class -> files) in one scan; stop with
        the list of bad ones, or leave them out (on_bad_file). ``problems`` found before (class
        folders without images) stop the run in the same message, so one round fixes a corpus."""
        files = [f for classes in splits.values() for paths in classes.values() for f in paths]
        cache = scan_cache_file(self.scan_cache_dir, self.root) if self.scan_cache_dir else None
        result = scan_images(files, cache, workers=min(8, len(os.sched_getaffinity(0))))
        self.digests.update(result.digests)
        if result.decoded:
            log.info("Checked %d images by decoding them (%d known from the last scan)",
                     result.decoded, result.total - result.decoded)  # fmt: skip
        if problems or (result.bad and self.on_bad_file == "error"):
            parts = list(problems)
            if result.bad:
                parts.append(
                    f"{len(result.bad)} image file(s) cannot be decoded:\n{describe_bad(result.bad)}\n"
                    "Delete or replace them, or set data.on_bad_file=skip to train without them."
                )
            raise DataError("\n".join(parts))
        if not result.bad:
            return splits
        log.warning("Leaving out %d image file(s) that cannot be decoded (data.on_bad_file=skip):\n%s",
                    len(result.bad), describe_bad(result.bad))  # fmt: skip
        self.left_out["cannot be decoded"] = self.left_out.get("cannot be decoded", 0) + len(result.bad)
        kept = {
            split: {name: [f for f in paths if str(f) not in result.bad] for name, paths in classes.items()}
            for split, classes in splits.items()
        }
        empty = [
            name if split == "all" else f"{split}/{name}"
            for split, classes in kept.items()
            for name, paths in classes.items()
            if not paths
        ]
        if empty:
            raise DataError(f"class folder(s) {empty} have no readable image left after skipping bad files.")
        return kept

    @property
    def class_names(self) -> list[str]:
        return self.discover()

    def set_preprocessing(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    # -- datasets ------------------------------------------------------------------------

    def _folder(self, path: Path, train: bool | None) -> ClassFolder:
        """``train=None``: no transform (used to read the labels for splitting)."""
        assert self.preprocessing is not None and self._classes is not None
        transform = None if train is None else build_transforms(self.preprocessing, train, self.augment)
        return ClassFolder(
            str(path), self.files[path], on_bad_file=self.on_bad_file, transform=transform, loader=load_rgb
        )

    def use_feature_cache(self, cache: FeatureCache, views: int = 1, seed: int = 0) -> None:
        """Serve cached backbone features instead of images: ``views`` augmented views of each
        training image (1: the exact evaluation transform), one exact view of val and test."""
        self.feature_cache, self.cache_views, self.cache_seed = cache, views, seed

    def _image_datasets(self, augment_train: bool = True) -> dict[str, Dataset]:
        if self.preprocessing is None:
            raise RuntimeError("set_preprocessing() must be called before setup(): the backbone decides it")
        self.discover()
        assert self._layout is not None
        datasets: dict[str, Dataset] = {}
        if "all" in self._layout or "val" not in self._layout:
            source = self._layout.get("train", self._layout.get("all"))
            assert source is not None
            fractions = {k: v for k, v in self.fractions.items() if k == "val" or "test" not in self._layout}
            labels = self._folder(source, None).targets
            split = stratified_split(labels, fractions, self.seed, self.class_names)
            train_set, eval_set = self._folder(source, augment_train), self._folder(source, False)
            datasets["train"] = Subset(train_set, split["train"])
            for name in fractions:
                datasets[name] = Subset(eval_set, split[name])
        else:
            datasets["train"] = self._folder(self._layout["train"], augment_train)
            datasets["val"] = self._folder(self._layout["val"], False)
        if "test" in self._layout:
            datasets["test"] = self._folder(self._layout["test"], False)
        if len(datasets["val"]) == 0:  # type: ignore[arg-type]
            raise DataError("the validation split is empty: set data.val_fraction above 0 or add val/.")
        if not datasets.get("test"):
            log.warning("No test split (no test/ folder and data.test_fraction=0): testing on val.")
            datasets["test"] = datasets["val"]
        self._check_leakage(datasets)
        self._check_balance(datasets["train"])
        # Each split's image files and labels, in dataset order (also the cached features' order).
        self.split_files = {name: samples(ds) for name, ds in datasets.items()}
        return datasets

    def _warn_once(self, message: str, *args: Any) -> None:
        """A data warning, logged once however often the splits are rebuilt."""
        text = message % args
        if text not in self._warned:
            self._warned.add(text)
            log.warning(text)

    def _check_leakage(self, datasets: dict[str, Dataset]) -> None:
        """Validation or test images with the same bytes as a training image (copies, the same
        photo saved twice) make the scores look better than they are: report the pairs, and
        leave them out with data.drop_duplicates=true. First, the same bytes under two classes
        (:meth:`_check_labels`)."""
        if not self.digests:
            return  # no scan, no hashes
        self._check_labels(datasets)
        train_files, _ = samples(datasets["train"])
        in_train = {self.digests[f]: f for f in train_files if f in self.digests}
        test_is_val = datasets.get("test") is datasets["val"]
        for name in ("val", "test"):
            dataset = datasets.get(name)
            if dataset is None or (name == "test" and test_is_val):
                continue
            files, _ = samples(dataset)
            leaks = [i for i, f in enumerate(files) if self.digests.get(f) in in_train]
            if not leaks:
                continue
            pairs = "; ".join(f"{files[i]} = {in_train[self.digests[files[i]]]}" for i in leaks[:5])
            more = f" (and {len(leaks) - 5} more)" if len(leaks) > 5 else ""
            if self.drop_duplicates:
                datasets[name] = without(dataset, set(leaks))
                if name == "val" and test_is_val:
                    datasets["test"] = datasets["val"]
                self.left_out[f"copy of a training image in {name}"] = len(leaks)
                self._warn_once("Left %d %s image(s) out: copies of training images: %s%s",
                            len(leaks), name, pairs, more)  # fmt: skip
            else:
                self._warn_once(
                    "Leakage: %d %s image(s) have the same content as a training image, so %s scores "
                    "overstate accuracy: %s%s. Remove the copies, or set data.drop_duplicates=true.",
                    len(leaks), name, name, pairs, more,
                )  # fmt: skip

    def _check_labels(self, datasets: dict[str, Dataset]) -> None:
        """The same bytes in two class folders (in any split) is a labelling error: one of the
        labels is wrong, and training learns both. Report the copies with their classes, and
        leave every copy out with data.drop_duplicates=true."""
        test_is_val = datasets.get("test") is datasets["val"]
        splits = {name: ds for name, ds in datasets.items() if not (name == "test" and test_is_val)}
        by_content: dict[str, dict[int, str]] = {}  # content hash -> label -> its first file
        for dataset in splits.values():
            for file, label in zip(*samples(dataset), strict=True):
                digest = self.digests.get(file)
                if digest is not None:
                    by_content.setdefault(digest, {}).setdefault(label, file)
        mixed = {digest: labels for digest, labels in by_content.items() if len(labels) > 1}
        if not mixed:
            return
        names = self.class_names
        pairs = "; ".join(
            " = ".join(f"{file} ({names[label]})" for label, file in sorted(labels.items()))
            for labels in list(mixed.values())[:5]
        )
        more = f" (and {len(mixed) - 5} more)" if len(mixed) > 5 else ""
        if not self.drop_duplicates:
            self._warn_once(
                "Labelling: %d image(s) are in two classes at once (the same bytes in two class folders), "
                "so one of their labels is wrong: %s%s. Fix the labels, or set data.drop_duplicates=true "
                "to leave every copy out.",
                len(mixed), pairs, more,
            )  # fmt: skip
            return
        dropped = 0
        for name, dataset in splits.items():
            files, _ = samples(dataset)
            drop = {i for i, file in enumerate(files) if self.digests.get(file) in mixed}
            if drop:
                datasets[name] = without(dataset, drop)
                dropped += len(drop)
        if test_is_val:
            datasets["test"] = datasets["val"]
        self.left_out["same image in two classes"] = dropped
        self._warn_once("Left %d image file(s) out: the same image in two classes "
                        "(data.drop_duplicates=true): %s%s", dropped, pairs, more)  # fmt: skip

    def _check_balance(self, train: Dataset) -> None:
        _, labels = samples(train)
        counts = [labels.count(i) for i in range(len(self.class_names))]
        self.train_class_counts = counts
        low, high = min(counts), max(counts)
        if self.balance == "none" and low > 0 and high / low >= IMBALANCE_RATIO:
            names = self.class_names
            self._warn_once(
                "Imbalanced classes: %s has %d training images, %s only %d (%.1fx). A classifier "
                "then favours the large classes; consider data.balance=weighted_loss or "
                "data.balance=weighted_sampler.",
                names[counts.index(high)], high, names[counts.index(low)], low, high / low,
            )  # fmt: skip

    def loss_weights(self) -> torch.Tensor | None:
        """Per-class weights of the training loss (data.balance=weighted_loss): inverse class
        frequency, 1 on average over the samples."""
        if self.balance != "weighted_loss" or not self.train_class_counts:
            return None
        counts = torch.tensor(self.train_class_counts, dtype=torch.float32).clamp(min=1)
        return counts.sum() / (len(counts) * counts)

    def use_probe_cache(self, cache: FeatureCache) -> None:
        """LP-FT: the images train as images, and :meth:`probe_features` serves the exact
        features of the training and validation images for the linear probe before that."""
        self.probe_cache = cache

    def probe_features(self) -> dict[str, CachedFeatures]:
        """Cached features of the training and validation images under the evaluation transform
        (computed first where no cache file matches)."""
        assert self.probe_cache is not None, "use_probe_cache() first"
        if not self._probe:
            images = self._image_datasets(augment_train=False)
            self._probe = self._cached(self.probe_cache, {k: images[k] for k in ("train", "val")}, views=1)
        return self._probe  # type: ignore[return-value]

    def _cached(self, cache: FeatureCache, images: dict[str, Dataset], views: int) -> dict[str, Dataset]:
        """Every split of ``images`` as cached features, computed first where no file matches."""
        assert self.preprocessing is not None
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        exact = {"eval": self.preprocessing.to_dict()}
        train = {"train": self.preprocessing.to_dict(), "augment": self.augment}
        out: dict[str, Dataset] = {}
        for name, dataset in images.items():
            if name == "test" and dataset is images["val"]:
                out[name] = out["val"]
                continue
            files, labels = samples(dataset)
            augmented = name == "train" and views > 1
            transform = train if augmented else exact
            features = cache.get(
                name, dataset, files, labels, transform=transform,
                views=views if augmented else 1, seed=self.cache_seed, device=device,
            )  # fmt: skip
            if features.kept is not None:  # files that broke while caching: left out with their labels
                self._note_skipped(name, files, sorted(set(range(len(files))) - set(features.kept)))
                self.split_files[name] = (
                    [files[i] for i in features.kept],
                    [labels[i] for i in features.kept],
                )
            out[name] = features
        return out

    def _note_skipped(self, split: str, files: Sequence[str], positions: Sequence[int]) -> None:
        self.skipped.setdefault(split, set()).update(files[i] for i in positions)

    def count_skipped(self) -> dict[str, int]:
        """Files that could not be read during the run (data.on_bad_file=skip) and were left out
        with their labels, per split, over every process; also entered in :attr:`left_out`."""
        for name, dataset in self.datasets.items():
            if name == "test" and dataset is self.datasets.get("val"):
                continue
            positions = skipped_positions(dataset)
            if positions:
                self._note_skipped(name, samples(dataset)[0], positions)
        merged = {name: set(files) for name, files in self.skipped.items()}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, merged)
            for other in everyone:
                for name, files in other.items():
                    merged.setdefault(name, set()).update(files)
        counts = {name: len(files) for name, files in merged.items() if files}
        for name, n in counts.items():
            self.left_out[f"unreadable during the run ({name})"] = n
        return counts

    def _features(self) -> dict[str, Dataset]:
        assert self.feature_cache is not None
        images = self._image_datasets(augment_train=self.cache_views > 1)
        return self._cached(self.feature_cache, images, self.cache_views)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.datasets = self._features() if self.feature_cache is not None else self._image_datasets()

    def set_epoch(self, epoch: int) -> None:
        """Cached training features with several views: epoch ``epoch`` reads view ``epoch % views``."""
        train = self.datasets.get("train")
        if isinstance(train, CachedFeatures):
            train.set_epoch(epoch)

    def split_sizes(self) -> dict[str, int]:
        return {name: len(ds) for name, ds in self.datasets.items()}  # type: ignore[arg-type]

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        from functools import partial

        from transfer_learning.run.preemption import loader_worker_init

        dataset = self.datasets[split]
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world_size = self.trainer.world_size if self.trainer is not None else 1
        per_process = len(dataset) // world_size  # type: ignore[arg-type]
        # Cached features are rows of a tensor: loader workers would only add overhead.
        workers = 0 if isinstance(dataset, CachedFeatures) else self.num_workers
        sampler = self._balanced_sampler() if train else self._eval_sampler(dataset, train)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=workers,
            # Exact resumes (random_state.RandomState): training workers start afresh each epoch,
            # seeded from the main process's random state, which checkpoints carry; evaluation
            # (no random transforms) keeps its workers and seeds them from its own generator,
            # taking nothing from that state.
            persistent_workers=workers > 0 and not train,
            generator=None if train else torch.Generator().manual_seed(0),
            # Seeded as Lightning seeds workers; a SIGTERM to every process (SLURM) leaves the
            # stopping to the main process.
            worker_init_fn=partial(loader_worker_init, rank=rank, main=os.getpid()) if workers else None,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_present,  # a file skipped mid-run leaves with its label
            # A last batch of one sample breaks BatchNorm in training mode.
            drop_last=train and per_process > self.batch_size,
        )

    def _balanced_sampler(self) -> WeightedRandomSampler | None:
        """data.balance=weighted_sampler: each class drawn equally often (with replacement).
        Under DDP Lightning splits it across processes."""
        if self.balance != "weighted_sampler":
            return None
        _, labels = self.split_files["train"]
        counts = torch.bincount(torch.tensor(labels), minlength=len(self.class_names)).clamp(min=1)
        weights = (1.0 / counts.double())[torch.tensor(labels)]
        return WeightedRandomSampler(weights.tolist(), num_samples=len(labels), replacement=True)

    def _eval_sampler(self, dataset: Dataset, train: bool) -> UnrepeatedDistributedSampler | None:
        """Under DDP, evaluation shards that may differ by one sample: Lightning's
        DistributedSampler would pad them to equal length by repeating samples, and those would
        be counted twice. Training keeps Lightning's sampler."""
        trainer = self.trainer
        if train or trainer is None or trainer.world_size <= 1:
            return None
        return UnrepeatedDistributedSampler(
            dataset,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            shuffle=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def without(dataset: Dataset, positions: set[int]) -> Subset:
    """``dataset`` less the samples at ``positions``: a Subset of the underlying dataset (never a
    Subset of a Subset, which :func:`samples` could not read)."""
    keep = [i for i in range(len(dataset)) if i not in positions]  # type: ignore[arg-type]
    if isinstance(dataset, Subset):
        return Subset(dataset.dataset, [dataset.indices[i] for i in keep])
    return Subset(dataset, keep)


def samples(dataset: Dataset) -> tuple[list[str], list[int]]:
    """File paths and labels of an ImageFolder, a Subset of one or a ConcatDataset of those, in
    dataset order."""
    if isinstance(dataset, ConcatDataset):
        parts = [samples(part) for part in dataset.datasets]
        return [f for files, _ in parts for f in files], [y for _, labels in parts for y in labels]
    if isinstance(dataset, Subset):
        base: Any = dataset.dataset
        pairs = [base.samples[i] for i in dataset.indices]
    else:
        pairs = list(dataset.samples)  # type: ignore[attr-defined]
    return [p for p, _ in pairs], [int(label) for _, label in pairs]
