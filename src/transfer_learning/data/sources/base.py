"""The data-source seam: a source answers one question, and everything downstream is shared.

Which images, with which targets, in which split, and the class names: that is a
:class:`Listing`, and producing one is all a :class:`DataSource` does. The data module then
decodes and scans the files, splits them (when the listing does not), checks them for leakage
and imbalance, and serves them, the same way for every source. A fork adds a source by putting
one module with a ``DataSource`` subclass in this folder and one YAML file in ``conf/data/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from transfer_learning.errors import ConfigError

TASKS = ("multiclass", "multilabel")
SPLITS = ("train", "val", "test")


def check_task(task: str | None) -> str | None:
    """``task`` when it is one the template knows (None: the source decides)."""
    if task is not None and task not in TASKS:
        raise ConfigError(f"task={task}: use null (the data decides), multiclass or multilabel.")
    return task


@dataclass
class Listing:
    """What a source found.

    ``targets[i]`` holds the class indices of ``files[i]`` (exactly one for multiclass).
    ``splits`` gives each file's split; None asks for the seeded split. A listing without any
    ``val`` file gets val (and test, when it has no ``test`` file either) split out of its
    ``train`` files; one with val but no test is tested on val.
    """

    files: list[Path]
    targets: list[list[int]]
    class_names: list[str]
    task: str
    splits: list[str] | None = None
    where: str = ""  # for messages: "data.root=/x", "data.file=/x/labels.csv"
    left_out: dict[str, int] = field(default_factory=dict)  # why -> how many files
    # Listed files that are not there, with where they were named ("row 7"): with
    # data.on_bad_file=skip they are left out and counted, else they stop the run.
    missing: dict[Path, str] = field(default_factory=dict)
    # Problems to report together with the decode scan's findings, so that one round of
    # fixes repairs a data set (e.g. class folders without images).
    problems: list[str] = field(default_factory=list)
    rows: list[int] | None = None  # each file's row in a table (CSV), for messages
    origin: Path | None = None  # the folder or file listed: names the scan cache

    def __post_init__(self) -> None:
        if len(self.targets) != len(self.files) or (
            self.splits is not None and len(self.splits) != len(self.files)
        ):
            raise ValueError("a Listing needs one target (and split) per file")
        check_task(self.task)

    def place(self, i: int) -> str:
        """Where file ``i`` is named, for messages: its row, or its path."""
        return f"row {self.rows[i]}" if self.rows is not None else str(self.files[i])

    def subset(self, keep: list[int]) -> Listing:
        """The same listing with only the files at positions ``keep``."""
        return Listing(
            files=[self.files[i] for i in keep],
            targets=[self.targets[i] for i in keep],
            class_names=self.class_names,
            task=self.task,
            splits=None if self.splits is None else [self.splits[i] for i in keep],
            where=self.where,
            left_out=dict(self.left_out),
            missing=dict(self.missing),
            problems=list(self.problems),
            rows=None if self.rows is None else [self.rows[i] for i in keep],
            origin=self.origin,
        )


class DataSource(ABC):
    """Which images, with which targets, in which split, and the class names.

    Subclasses take plain keyword settings (``data.<name>`` in the config: strings, numbers,
    lists), so a run folder can rebuild them from its ``run_config.yaml`` without importing
    anything by name. Their ``__init__`` parameters should not reuse the data module's own
    setting names (``batch_size``, ``seed``, ...), except ``root`` and ``generate``, which
    the data module hands to any source that takes them.
    """

    def prepare(self) -> None:  # noqa: B027 (a hook: most sources need nothing here)
        """Once per node before reading, e.g. writing demo data on first use."""

    @abstractmethod
    def read(self, task: str | None = None) -> Listing:
        """The listing. ``task``: the run's ``task`` setting (None: the source decides)."""

    def describe(self) -> str:
        """The setting that names the data, for messages (e.g. ``data.file=/x/labels.csv``)."""
        return type(self).__name__
