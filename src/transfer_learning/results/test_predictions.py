"""``test_predictions.json`` in the run folder: every test image's (calibrated) probabilities and
target, so two runs can be compared on the same images (the sweep table's paired bootstrap) and a
user can recompute any test metric without the checkpoint.

The file is data: it is read back with the pickle-free JSON reader, every field checked for type
and shape, and a file that does not hold what it should is refused naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transfer_learning.readers import MiB, UntrustedFileError, read_json

FILE = "test_predictions.json"
FOLD_FILE = "fold_predictions.json"  # a cross-validation fold's val images: out-of-fold
LIMIT = 256 * MiB
TASKS = ("multiclass", "multilabel")


@dataclass(frozen=True)
class TestPredictions:
    task: str
    class_names: list[str]
    thresholds: list[float] | None  # multi-label: each class's threshold
    files: list[str]
    targets: torch.Tensor  # (N,) class indices; multi-label (N, C) 0/1
    probs: torch.Tensor  # (N, C) float64, what the test metrics scored
    logits: torch.Tensor | None = None  # (N, C) float64 before the temperature (a fold's file)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"


def write_test_predictions(
    path: Path,
    task: str,
    class_names: list[str],
    thresholds: list[float] | None,
    files: list[str],
    targets: list[Any],
    probs: torch.Tensor,
    logits: torch.Tensor | None = None,
) -> Path:
    """Write ``path``: ``targets`` as the data module gives them (a class index; multi-label a
    tuple of indices), ``probs`` (N, C) rounded to 7 digits; ``logits``, the model's before any
    temperature, where given (a fold's out-of-fold images: cv.refit=true fits its temperature
    on them)."""
    record = {
        "task": task,
        "class_names": list(class_names),
        "thresholds": thresholds,
        "files": list(files),
        "targets": [sorted(int(i) for i in t) if isinstance(t, tuple | list) else int(t) for t in targets],
        "probs": [[round(float(p), 7) for p in row] for row in probs.tolist()],
    }
    if logits is not None:
        record["logits"] = [[round(float(z), 5) for z in row] for row in logits.tolist()]
    path.write_text(json.dumps(record) + "\n")
    return path


def _refuse(path: Path, what: str) -> UntrustedFileError:
    return UntrustedFileError(
        f"refusing {path}: {what}. It is written by the run after testing; run the job again to "
        "write it anew."
    )


def read_test_predictions(path: Path) -> TestPredictions:
    """The file written by :func:`write_test_predictions`, checked field by field."""
    data = read_json(path, fix="Run the job again to write it anew.", limit=LIMIT)
    if not isinstance(data, dict):
        raise _refuse(path, "it is not a JSON object")
    task, names, files = data.get("task"), data.get("class_names"), data.get("files")
    if task not in TASKS:
        raise _refuse(path, f"its 'task' is not one of {', '.join(TASKS)}")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _refuse(path, "its 'class_names' is not a list of names")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise _refuse(path, "its 'files' is not a list of paths")
    k, n = len(names), len(files)
    probs = data.get("probs")
    if not isinstance(probs, list) or len(probs) != n or not all(_row(r, k) for r in probs):
        raise _refuse(path, f"its 'probs' is not {n} rows of {k} numbers in [0, 1]")
    targets = data.get("targets")
    if not isinstance(targets, list) or len(targets) != n:
        raise _refuse(path, f"its 'targets' is not {n} entries")
    thresholds = data.get("thresholds")
    if task == "multiclass":
        if not all(_index(t, k) for t in targets):
            raise _refuse(path, f"its 'targets' are not class indices below {k}")
        target_tensor = torch.tensor(targets, dtype=torch.long)
        thresholds = None
    else:
        if not all(isinstance(t, list) and all(_index(i, k) for i in t) for t in targets):
            raise _refuse(path, f"its 'targets' are not lists of class indices below {k}")
        if not isinstance(thresholds, list) or len(thresholds) != k or not _row(thresholds, k):
            raise _refuse(path, f"its 'thresholds' is not {k} numbers in [0, 1]")
        target_tensor = torch.zeros(n, k, dtype=torch.long)
        for row, t in enumerate(targets):
            target_tensor[row, t] = 1
    probs_tensor = torch.tensor(probs, dtype=torch.float64).reshape(n, k)
    logits = data.get("logits")
    if logits is not None and (not isinstance(logits, list) or len(logits) != n
                               or not all(_row(r, k, bounded=False) for r in logits)):  # fmt: skip
        raise _refuse(path, f"its 'logits' is not {n} rows of {k} finite numbers")
    logits_tensor = None if logits is None else torch.tensor(logits, dtype=torch.float64).reshape(n, k)
    return TestPredictions(task, names, thresholds, files, target_tensor, probs_tensor, logits_tensor)


def _index(value: Any, k: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < k


def _row(values: Any, k: int, bounded: bool = True) -> bool:
    """``k`` finite numbers (``bounded``: each in [0, 1])."""
    return (
        isinstance(values, list)
        and len(values) == k
        and all(
            isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and (not bounded or 0 <= v <= 1)
            for v in values
        )
    )
