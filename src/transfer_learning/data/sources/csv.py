"""Labels as a labelling tool exports them: a CSV of image path -> label(s), optionally a split.

``python train.py data=csv data.file=labels.csv`` reads columns ``path`` and ``label``
(``data.path_column``, ``data.label_column``). Relative paths start at the CSV's folder, or at
``data.root`` when set. An optional ``split`` column (``data.split_column``) holds train, val
(valid, validation) or test per row; without it the seeded stratified split decides.

Multi-label (``task=multilabel``): the label cell holds several labels separated by
``data.label_delimiter`` (a space by default), or there is one 0/1 column per class
(``data.label_columns=[a,b,c]``; with ``task=multilabel`` and no label column, every column
other than the path and split columns whose cells are all 0 or 1 is taken as a class). A
single-label CSV never splits its cells, so its labels may contain spaces.

Every mistake stops the run before anything is written, with one message naming the CSV,
each row (as a spreadsheet numbers them: the header is row 1) and the fix. A UTF-8 byte order
mark and CRLF line endings are read as if they were not there.
"""

from __future__ import annotations

import csv
import difflib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transfer_learning.data.demo import generate_multilabel_shapes
from transfer_learning.data.sources.base import DataSource, Listing, check_task
from transfer_learning.errors import ConfigError, DataError
from transfer_learning.readers import read_csv_rows

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_LINES = 20  # problems listed in one message


def suggestion(name: str, choices: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


class CsvSource(DataSource):
    """Images and labels listed in the CSV ``file`` (see the module docstring)."""

    def __init__(
        self,
        file: str | Path,
        path_column: str = "path",
        label_column: str = "label",
        label_delimiter: str = " ",
        split_column: str = "split",
        root: str | Path | None = None,
        label_columns: Sequence[str] | None = None,
        task: str | None = None,
        generate: Mapping[str, Any] | None = None,
    ) -> None:
        self.file = Path(file).expanduser().absolute()
        self.path_column, self.label_column, self.split_column = path_column, label_column, split_column
        if not label_delimiter:
            raise ConfigError(
                "data.label_delimiter is empty: use the character between labels, e.g. ' ' or ';'."
            )
        self.label_delimiter = label_delimiter
        self.root = Path(root).expanduser().absolute() if root else None
        self.label_columns = list(label_columns) if label_columns else None
        self.task = check_task(task)
        self.generate = dict(generate) if generate else None

    def describe(self) -> str:
        return f"data.file={self.file}"

    def prepare(self) -> None:
        """The multi-label demo data set (``generate``), written on first use, but only where it
        was configured to go (a mistyped data.file must fail, not become demo data)."""
        if self.generate is None or self.file.exists():
            return
        spec = dict(self.generate)
        folder = Path(spec.pop("root")).expanduser().absolute()
        if folder / "labels.csv" == self.file:
            log.info("Generating the multi-label demo data set in %s", folder)
            generate_multilabel_shapes(folder, **spec)

    # -- reading ----------------------------------------------------------------------------

    def _table(self) -> tuple[list[str], list[tuple[int, list[str]]]]:
        """The header and the (row number, cells) of every row that is not blank."""
        if not self.file.is_file():
            raise DataError(
                f"data.file={self.file} does not exist or is not a file. Point data.file at a CSV with "
                f"columns {self.path_column},{self.label_column} (an image path and its label per row)."
            )
        try:
            records = list(enumerate(read_csv_rows(self.file), start=1))  # a BOM is dropped
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.file} is not UTF-8 text ({exc.reason}): save it as CSV UTF-8.") from None
        except csv.Error as exc:
            raise DataError(f"{self.file} is not a readable CSV ({exc}). Save it again as CSV.") from None
        if not records:
            raise DataError(
                f"{self.file} is empty: it needs a header row ({self.path_column},{self.label_column})."
            )
        header = [name.strip() for name in records[0][1]]
        rows = [(n, cells) for n, cells in records[1:] if any(c.strip() for c in cells)]
        if not rows:
            raise DataError(f"{self.file} has a header but no rows: add one row per image.")
        return header, rows

    def _column(self, header: list[str], name: str, setting: str) -> int:
        if name in header:
            return header.index(name)
        close = suggestion(name, header)
        fix = f"Did you mean {close!r}? Set {setting}={close}." if close else f"Set {setting} to one of them."
        raise DataError(
            f"{self.file} row 1 (the header) has no column {name!r} ({setting}={name}). "
            f"Its columns: {', '.join(header)}. {fix}"
        )

    def _flag_columns(
        self, header: list[str], rows: list[tuple[int, list[str]]], skip: set[int]
    ) -> list[str]:
        """Columns whose every cell is 0 or 1: the classes of a multi-label CSV without a label column."""
        return [
            name for i, name in enumerate(header)
            if i not in skip and all(_cell(cells, i) in ("0", "1") for _, cells in rows)
        ]  # fmt: skip

    def read(self, task: str | None = None) -> Listing:
        task = check_task(task) or self.task
        header, rows = self._table()
        path_at = self._column(header, self.path_column, "data.path_column")
        split_at = None
        if self.split_column in header:
            split_at = header.index(self.split_column)
        elif self.split_column != "split":  # the default may be absent; a name the user gave must not
            self._column(header, self.split_column, "data.split_column")
        flags = self.label_columns
        if flags is None and self.label_column not in header and task == "multilabel":
            flags = (
                self._flag_columns(header, rows, {path_at, *([split_at] if split_at is not None else [])})
                or None
            )
        if flags is not None:
            flag_at = [self._column(header, name, "data.label_columns") for name in flags]
            task = task or "multilabel"
        else:
            label_at = self._column(header, self.label_column, "data.label_column")
            task = task or "multiclass"
        problems: list[str] = []
        base = self.root or self.file.parent
        first_row: dict[Path, int] = {}
        files, labels, splits, numbers = [], [], [], []
        missing: dict[Path, str] = {}
        for n, cells in rows:
            cell = _cell(cells, path_at)
            if not cell:
                problems.append(
                    f"row {n}: the {self.path_column!r} cell is empty. "
                    "Write the image's path, or remove the row."
                )
                continue
            path = Path(os.path.normpath(base / Path(cell).expanduser()))
            if path in first_row:
                problems.append(
                    f"rows {first_row[path]} and {n} both name {cell} ({path}). Keep one row per image "
                    "(several labels of one image: task=multilabel, all of them in one cell)."
                )
                continue
            first_row[path] = n
            if flags is not None:
                names = self._flag_labels(n, cells, flags, flag_at, problems)
            else:
                names = self._cell_labels(n, _cell(cells, label_at), task, problems)
            split = self._split(n, cells, split_at, problems)
            if names is None or split is None:
                continue
            if task == "multiclass" and len(names) != 1:
                problems.append(
                    f"row {n}: {len(names)} labels ({' '.join(names)}) where one is expected: "
                    "set task=multilabel."
                )
                continue
            if not path.exists():
                missing[path] = f"row {n}: {cell} (no such file: {path})"
                continue
            files.append(path)
            labels.append(names)
            splits.append(split)
            numbers.append(n)
        if split_at is not None and not problems:
            self._check_unseen(labels, splits, numbers, problems)
        if problems:
            more = f"\n  ... and {len(problems) - MAX_LINES} more" if len(problems) > MAX_LINES else ""
            raise DataError(
                f"{self.file} has {len(problems)} problem(s):\n  " + "\n  ".join(problems[:MAX_LINES]) + more
            )
        names = sorted({name for row in labels for name in row})
        if task == "multiclass" and len(names) < 2:
            raise DataError(
                f"{self.file} has one class ({', '.join(names) or 'none'}) in column {self.label_column!r}; "
                "a classifier needs two or more."
            )
        index = {name: i for i, name in enumerate(names)}
        if task == "multiclass" and any(self.label_delimiter in name for name in names):
            log.warning(
                "%s: labels such as %r hold %r: each is read as one class. For several labels per image, set "
                "task=multilabel (data.label_delimiter separates them).",
                self.file, next(n for n in names if self.label_delimiter in n), self.label_delimiter,
            )  # fmt: skip
        return Listing(
            files=files,
            targets=[sorted(index[name] for name in row) for row in labels],
            class_names=names,
            task=task,
            splits=splits if split_at is not None else None,
            where=self.describe(),
            missing=missing,
            rows=numbers,
            origin=self.file,
        )

    def _cell_labels(self, n: int, cell: str, task: str, problems: list[str]) -> list[str] | None:
        if task == "multilabel":
            delimiter = self.label_delimiter
            parts = cell.split() if delimiter.isspace() else [p.strip() for p in cell.split(delimiter)]
            names = sorted({p for p in parts if p})
        else:
            names = [cell] if cell else []
        if not names:
            what = (
                f"its labels separated by {self.label_delimiter!r}" if task == "multilabel" else "its class"
            )
            problems.append(
                f"row {n}: the {self.label_column!r} cell is empty. Write {what}, or remove the row."
            )
            return None
        return names

    def _flag_labels(
        self, n: int, cells: list[str], flags: list[str], at: list[int], problems: list[str]
    ) -> list[str] | None:
        values = [_cell(cells, i) for i in at]
        wrong = [
            f"{name}={value!r}" for name, value in zip(flags, values, strict=True) if value not in ("0", "1")
        ]
        if wrong:
            problems.append(
                f"row {n}: {', '.join(wrong)}: each class column holds 0 or 1. Write 0 or 1 there."
            )
            return None
        return [name for name, value in zip(flags, values, strict=True) if value == "1"]

    def _split(self, n: int, cells: list[str], at: int | None, problems: list[str]) -> str | None:
        if at is None:
            return "train"
        value = _cell(cells, at)
        split = SPLIT_NAMES.get(value.lower())
        if split is None:
            problems.append(
                f"row {n}: {self.split_column}={value!r}: use train, val (or valid, validation) or test; "
                f"or drop the {self.split_column!r} column for the seeded split."
            )
        return split

    def _check_unseen(
        self, labels: list[list[str]], splits: list[str], numbers: list[int], problems: list[str]
    ) -> None:
        """A label of a val or test row that no train row has: the model could never predict it."""
        seen = {name for row, split in zip(labels, splits, strict=True) if split == "train" for name in row}
        if not seen:
            problems.append(
                f"no row has {self.split_column}=train: mark the training rows train (or drop the column)."
            )
            return
        for row, split, n in zip(labels, splits, numbers, strict=True):
            for name in row:
                if name not in seen:
                    close = suggestion(name, sorted(seen))
                    hint = f" (did you mean {close!r}?)" if close else ""
                    problems.append(
                        f"row {n} ({split}): label {name!r}{hint} is on no train row, so the model "
                        "cannot learn it. Fix the label, or add training rows with it."
                    )


def _cell(cells: list[str], i: int) -> str:
    return cells[i].strip() if i < len(cells) else ""
