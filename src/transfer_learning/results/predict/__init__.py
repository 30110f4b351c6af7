"""Predict with a trained checkpoint.

Usage: ``tl-predict ckpt_path=CKPT images=PATH|[PATH,...] [output=preds.csv|preds.json] [top_k=K]
[batch_size=N] [device=auto|cpu|cuda] [threshold=P] [num_workers=N]`` (or ``python -m
transfer_learning.results.predict key=value ...``; ``--help`` lists the options; the command line
is read in :mod:`transfer_learning.cli.predict`)

* Each ``images=`` path is an image file, a folder (every image file under it, sorted; hidden entries left
  out) or a glob pattern (``'photos/**/*.jpg'``, expanded here when no such path exists). Each
  real file is predicted once. Only regular files are read: a FIFO or a device (a link to
  ``/dev/zero``) named on the command line is reported as an error, one in a folder or matched by
  a pattern is left out with a note; none of them is opened.
* The checkpoint alone is enough: it carries the network, the class names and the preprocessing.
* One line per image on stdout: path, top-1 class, its probability, then the other top-k classes,
  tab separated (tabs, newlines and other control characters in names written as ``\\t``,
  ``\\n``, ...). The CSV output neutralises cells a spreadsheet would run as formulas (a leading
  ``'`` before ``= + - @``).
  ``output=`` also writes every probability to a CSV or JSON file (chosen by its suffix); the
  CSV's columns: ``file``, ``predicted``, ``score``, ``uncertain``, ``top1_class``, ``top1_prob``,
  ... (up to the top k), ``prob_<class>`` (one per class), ``error``.
* A multi-label checkpoint (``task=multilabel``) gives each image its label set instead: every
  class whose sigmoid probability reaches the class's threshold (stored in the checkpoint),
  possibly none. Stdout: path, the label set (``(no label)`` when empty), every class's
  probability; the CSV's columns: ``file``, ``predicted`` (the label set, names joined by a
  space), ``prob_<class>`` (one per class), ``error``; no top-k and no ``uncertain`` flag (a
  maximum softmax probability means nothing here).
* A file that cannot be read (missing, not an image, truncated) is reported on stderr and in the
  output file, and skipped. Exit status: 0 when every input was predicted, 1 when some were
  bad (the others are still written), 2 for a usage error (an unreadable checkpoint, say).
* Out-of-distribution heuristic: an image whose top probability is below a threshold is marked
  ``uncertain``. Images far from the training data often, not always, get a low top
  probability; a confident wrong answer is still possible. ``threshold=P`` sets it; without
  it, ``<checkpoint stem>.threshold.json`` next to the checkpoint (written by the evaluation
  command, key ``max_softmax_threshold``) is used when it exists, else nothing is flagged.

In Python::

    classifier = Classifier.from_checkpoint("best.ckpt", device="auto")
    classifier.predict(["a.jpg", pil_image, chw_tensor], top_k=3)  # one Prediction per input
    predictions, errors = classifier.predict_files(["photos/", "more/*.png"])  # bad files skipped
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transfer_learning.results.predict.classifier import (
        THRESHOLD_KEY,
        Classifier,
        Prediction,
        check_threshold,
        read_threshold,
        resolve_device,
        threshold_file,
    )
    from transfer_learning.results.predict.command import auto_workers, checkpoint_problem, run
    from transfer_learning.results.predict.inputs import (
        GLOB_CHARACTERS,
        BadInput,
        Input,
        check_tensor,
        describe,
        expand_paths,
        has_glob,
        problem,
        tensor_to_image,
    )
    from transfer_learning.results.predict.outputs import (
        csv_columns,
        prediction_record,
        terminal_line,
        write_csv,
        write_explanations,
        write_json,
        write_output,
    )

# Where each name lives. ``python -m transfer_learning.results.predict`` imports this package
# before its ``__main__`` reads the command line: the names (and torch with them) load when first
# used, so that ``--help`` and a mistake in the command line still answer before torch loads.
_HOMES = {
    "classifier": ("THRESHOLD_KEY", "Classifier", "Prediction", "check_threshold", "read_threshold",
                   "resolve_device", "threshold_file"),
    "command": ("auto_workers", "checkpoint_problem", "run"),
    "inputs": ("GLOB_CHARACTERS", "BadInput", "Input", "check_tensor", "describe", "expand_paths",
               "has_glob", "problem", "tensor_to_image"),
    "outputs": ("csv_columns", "prediction_record", "terminal_line", "write_csv", "write_explanations",
                "write_json", "write_output"),
}  # fmt: skip
_HOME = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "GLOB_CHARACTERS",
    "THRESHOLD_KEY",
    "BadInput",
    "Classifier",
    "Input",
    "Prediction",
    "auto_workers",
    "check_tensor",
    "check_threshold",
    "checkpoint_problem",
    "csv_columns",
    "describe",
    "expand_paths",
    "has_glob",
    "prediction_record",
    "problem",
    "read_threshold",
    "resolve_device",
    "run",
    "tensor_to_image",
    "terminal_line",
    "threshold_file",
    "write_csv",
    "write_explanations",
    "write_json",
    "write_output",
]


def __getattr__(name: str) -> object:
    """A name of :data:`__all__`, imported from its module on first use (see :data:`_HOMES`)."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
