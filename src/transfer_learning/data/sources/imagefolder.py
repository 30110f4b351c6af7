"""Images in class folders: ``<root>/<class>/<image>`` (split with the seeded split), or
``<root>/train|val[/test]/<class>/<image>`` (the splits as given). Class names are the folder
names, sorted. Hidden entries are ignored, symlink loops reported, each real file listed once
(see :func:`transfer_learning.data.images.list_images`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS

from transfer_learning.data.demo import generate_shapes
from transfer_learning.data.images import Listing as Walk
from transfer_learning.data.images import identity, is_hidden, list_images
from transfer_learning.data.sources.base import DataSource, Listing
from transfer_learning.errors import DataError

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"val": ("val", "valid", "validation"), "test": ("test",), "train": ("train",)}


def class_folders(
    folder: Path,
    seen: set[tuple[int, int]] | None = None,
    boundaries: set[tuple[int, int]] | None = None,
    problems: list[str] | None = None,
) -> tuple[dict[str, list[Path]], Walk]:
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
    walk = Walk()
    found = {}
    for c in classes:
        start = len(walk.files)
        list_images(c, seen, walk, boundaries=fences - {identity(c)})
        found[c.name] = sorted(walk.files[start:])
    if walk.unreadable:
        raise DataError(
            f"cannot read folder(s) {', '.join(walk.unreadable)}: permission denied. Fix their "
            "permissions (chmod -R u+rX) or move them out of data.root."
        )
    empty = [str(folder / name) for name, files in found.items() if not files]
    if empty:
        message = (
            f"class folder(s) with no images: {', '.join(empty)}. Add images "
            f"({', '.join(IMG_EXTENSIONS)}) or remove the folder."
            + (f" ({'; '.join(walk.notes())})" if walk.notes() else "")
        )
        if problems is None:
            raise DataError(message)
        problems.append(message)
    return found, walk


class ImageFolderSource(DataSource):
    """Class folders under ``root``. ``generate`` (demo data) writes the shapes data set to
    ``root`` first when it does not exist yet, but only into the folder it names (a mistyped
    data.root must fail, not quietly become demo data)."""

    def __init__(self, root: str | Path, generate: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        self.generate = dict(generate) if generate else None

    def describe(self) -> str:
        return f"data.root={self.root}"

    def prepare(self) -> None:
        if self.generate is not None and not self.root.exists():
            spec = dict(self.generate)
            target = Path(spec.pop("root", self.root)).expanduser()
            if target.absolute() == self.root:
                log.info("Generating the demo data set in %s", self.root)
                generate_shapes(self.root, **spec)

    def _layout(self) -> dict[str, Path]:
        if not self.root.is_dir():
            tree = "an ImageFolder tree (<root>/<class>/<image> or <root>/train|val/<class>/<image>)"
            if self.generate is not None:  # data=demo (the default), with data.root changed
                fix = (
                    f"The demo data (data=demo, the default) is generated only in its own folder "
                    f"({self.generate.get('root')}); for your own images, point data.root at {tree} "
                    f"with data=imagefolder: python train.py data=imagefolder data.root={self.root}"
                )
            else:
                fix = f"Point data.root at {tree}, or use data=demo."
            raise DataError(f"data.root={self.root} does not exist or is not a folder. {fix}")
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

    def read(self, task: str | None = None) -> Listing:
        layout = self._layout()
        seen: set[tuple[int, int]] = set()
        fences = {identity(self.root), *(identity(folder) for folder in layout.values())}
        problems: list[str] = []  # empty class folders: reported together with the scan's bad files
        walked = {split: class_folders(folder, seen, fences, problems) for split, folder in layout.items()}
        found = {split: classes for split, (classes, _) in walked.items()}
        walk = Walk.merged(part for _, part in walked.values())
        for note in walk.notes():
            log.warning("%s: %s", self.root, note)
        left_out = {}
        if walk.other_extensions:
            left_out["unsupported extension"] = sum(walk.other_extensions.values())
        if walk.special:
            left_out["not a regular file"] = len(walk.special)
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
        files, targets, splits = [], [], []
        for split, classes in found.items():
            for label, name in enumerate(names):
                files += classes[name]
                targets += [[label]] * len(classes[name])
                splits += [split] * len(classes[name])
        return Listing(
            files=files,
            targets=targets,
            class_names=names,
            task=task or "multiclass",
            splits=None if "all" in layout else splits,
            where=self.describe(),
            left_out=left_out,
            problems=problems,
            origin=self.root,
        )
