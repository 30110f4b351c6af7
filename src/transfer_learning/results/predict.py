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

if __name__ == "__main__":  # `python -m transfer_learning.results.predict`: the command line is
    # read before torch loads (--help answers at once); the work then imports this module.
    from transfer_learning.cli.predict import main as command

    raise SystemExit(command())

import argparse
import csv
import glob
import json
import logging
import os
import stat
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_pil_image
from tqdm import tqdm

from transfer_learning.cli import predict as cli_predict
from transfer_learning.data.images import (
    Listing,
    identity,
    is_image,
    list_images,
    load_rgb,
    to_rgb,
)
from transfer_learning.data.transforms import build_transforms
from transfer_learning.errors import ConfigError, DataError, TransferLearningError, user_message
from transfer_learning.escaping import csv_dict, visible
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.readers import NotRegularFile, file_kind, json_field

Input: TypeAlias = str | Path | Image.Image | torch.Tensor
THRESHOLD_KEY = "max_softmax_threshold"
GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class Prediction:
    """One image's classes: ``label`` (top-1) and its probability ``score``, every class's
    probability, the ``top_k`` (class, probability) pairs best first, whether the top
    probability is below the confidence threshold (``uncertain``), and where the image came
    from (``source``: its path, or ``<image N>`` / ``<tensor N>`` for in-memory inputs)."""

    label: str
    score: float
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]] = field(default_factory=list)
    uncertain: bool = False
    source: str = ""
    #: Multi-label checkpoints: the predicted label set (every class whose probability reaches its
    #: threshold; possibly empty), ``label`` those names joined by a space, ``score`` the highest
    #: probability, ``top_k`` empty (each class has its own sigmoid: no ranking of one answer).
    labels: list[str] | None = None

    @property
    def multilabel(self) -> bool:
        return self.labels is not None


@dataclass(frozen=True)
class BadInput:
    """An input that was skipped: the path (or pattern) as given, and why. ``kind``: ``file``,
    ``folder`` (no image files in it, or unreadable) or ``pattern`` (a glob matching nothing)."""

    source: str
    reason: str
    kind: str = "file"

    def message(self) -> str:
        if self.kind == "file":
            return f"cannot read image {self.source}: {self.reason}"
        return f"{self.source}: {self.reason}"


# -- finding the files ---------------------------------------------------------------------


def has_glob(text: str) -> bool:
    return any(c in GLOB_CHARACTERS for c in text)


def expand_paths(paths: Sequence[str | Path]) -> tuple[list[Path], list[BadInput], Listing]:
    """The image files that ``paths`` name, in order, each real file once: files as given (any
    extension: they are decoded to find out), folders walked recursively and glob patterns
    expanded (both keep image extensions only and leave hidden entries out). Returns the files,
    the inputs that name nothing usable, and what was left out (:meth:`Listing.notes`)."""
    files: list[Path] = []
    bad: list[BadInput] = []
    walks: list[Listing] = [Listing()]  # the first one: files left out of glob matches
    seen: set[tuple[int, int]] = set()

    def add(path: Path, given: str, matched: bool) -> bool:
        """Whether ``path`` (named, or ``matched`` by a pattern) holds images or was seen before."""
        if matched and identity(path.parent) in seen:  # a folder walked already holds it
            return True
        if not path.is_dir():
            if matched and not is_image(path):
                walks[0].other_extensions[path.suffix.lower()] += 1
                return False
            try:
                info = path.stat()
            except OSError as exc:  # a dangling symlink matched by a pattern
                bad.append(BadInput(given, exc.strerror or str(exc)))
                return True
            if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero never ends: not opened
                if matched:
                    walks[0].special.append(f"{path} ({file_kind(info.st_mode)})")
                    return False
                bad.append(BadInput(given, str(NotRegularFile(path, info.st_mode))))
                return True
            key = info.st_dev, info.st_ino
            if key not in seen:
                seen.add(key)
                files.append(path)
            return True
        if identity(path) in seen:  # walked already (`photos photos/sub`, or `photos/**`)
            return True
        try:
            listing = list_images(path, seen=seen)
        except DataError as exc:
            bad.append(BadInput(given, problem(exc), "folder"))
            return True
        walks.append(listing)
        files.extend(listing.files)
        bad.extend(BadInput(folder, "cannot be read (permission denied)", "folder")
                   for folder in listing.unreadable)  # fmt: skip
        found = bool(listing.files or listing.repeated or listing.unreadable)
        if not found and not matched:
            bad.append(BadInput(given, "no image files in this folder", "folder"))
        return found

    for item in paths:
        text = str(item)
        path = Path(text)
        if path.exists():
            add(path, text, matched=False)
        elif has_glob(text) and not os.path.lexists(text):
            matches = sorted(glob.glob(text, recursive=True))
            found = [add(Path(match), match, matched=True) for match in matches]
            if not any(found):
                bad.append(BadInput(text, "no image file matches this pattern", "pattern"))
        else:  # missing, or a dangling symlink
            bad.append(BadInput(text, "No such file or directory"))
    left_out = Listing.merged(walks)
    left_out.repeated = 0  # a file named twice (or reached through a link) is simply predicted once
    return files, bad, left_out


# -- decoding ------------------------------------------------------------------------------


def check_tensor(tensor: torch.Tensor) -> None:
    """An image tensor: (C, H, W) with 1, 3 or 4 channels, uint8 or floating point."""
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"expected an image tensor of shape (C, H, W) with C in 1, 3, 4, got {tuple(tensor.shape)}"
        )
    if not (tensor.is_floating_point() or tensor.dtype == torch.uint8):
        raise ValueError(f"expected a uint8 or floating point image tensor, got {tensor.dtype}")


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """A CHW image tensor (1, 3 or 4 channels) as a PIL image: uint8 values 0..255, or floating
    point values 0..1 (rounded to 8 bits, as a file would hold them; outside 0..1 clipped)."""
    check_tensor(tensor)
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = (tensor.float() * 255).round().clamp(0, 255).to(torch.uint8)
    return to_pil_image(tensor)


def describe(source: Input, index: int) -> str:
    if isinstance(source, str | Path):
        return str(source)
    return f"<{'image' if isinstance(source, Image.Image) else 'tensor'} {index}>"


def problem(exc: BaseException) -> str:
    """Why a file could not be decoded, in one line."""
    cause = exc.__cause__ if isinstance(exc, DataError) and exc.__cause__ else exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


class _Images(Dataset):
    """The inputs, each decoded and preprocessed as for validation; a file that fails gives its
    reason instead of a tensor (so a loader worker never raises)."""

    def __init__(self, inputs: Sequence[Input], transform: Any) -> None:
        self.inputs = inputs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        item = self.inputs[index]
        try:
            if isinstance(item, Image.Image):
                image = to_rgb(item)
            elif isinstance(item, torch.Tensor):
                image = to_rgb(tensor_to_image(item))
            else:
                image = load_rgb(item)
            if min(image.size) < 1:
                return index, None, "empty image (0 pixels)"
            return index, self.transform(image), None
        except Exception as exc:
            return index, None, problem(exc)


def _collate(
    batch: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in batch if x is not None]
    failed = [(i, reason or "unknown error") for i, x, reason in batch if x is None]
    stacked = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], stacked, failed


# -- the classifier ------------------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda (or cuda:N).") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is visible; use device=cpu.")
    return resolved


def threshold_file(checkpoint: str | Path) -> Path:
    """Where the evaluation command leaves the confidence threshold: next to the checkpoint."""
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.threshold.json")


def check_threshold(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(
            f"{where}: the confidence threshold must be a probability in [0, 1], got {value!r}."
        )
    return float(value)


def read_threshold(checkpoint: str | Path) -> float | None:
    """The ``max_softmax_threshold`` of ``<checkpoint stem>.threshold.json``, or None without one."""
    path = threshold_file(checkpoint)
    if not path.is_file():
        return None
    fix = f'A threshold file holds {{"{THRESHOLD_KEY}": P}}: fix or delete it, or pass threshold=P.'
    value = json_field(path, THRESHOLD_KEY, fix=fix)
    return check_threshold(value, str(path))


class Classifier:
    """A checkpoint turned into a callable: images in, class names and probabilities out.

    ``threshold``: a top probability below it marks a prediction ``uncertain`` (a heuristic for
    inputs unlike the training data); None flags nothing."""

    def __init__(self, module: TransferLearningModule, threshold: float | None = None) -> None:
        self.module = module.eval()
        self.class_names = list(module.class_names)
        self.multilabel = module.task == "multilabel"
        self.transform = build_transforms(module.preprocessing, train=False, augment={})
        self.threshold = check_threshold(threshold, "threshold")
        self.threshold_from = "given" if self.threshold is not None else ""
        #: Preprocessed images in, logits out: the network, or the same network exported (the
        #: server's ``backend=onnx``); calibration and decisions stay in :meth:`classify`.
        self.logits: Callable[[torch.Tensor], torch.Tensor] = self.module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", threshold: float | str | None = "auto"
    ) -> Classifier:
        """Load ``path`` on ``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``: the GPU when
        there is one). ``threshold="auto"`` reads ``<stem>.threshold.json`` next to the
        checkpoint when it exists; a number sets it; None flags nothing."""
        resolved = resolve_device(device)
        if threshold == "auto":
            value = read_threshold(path)
        elif isinstance(threshold, str):
            raise ValueError(f"threshold must be a probability, None or 'auto', got {threshold!r}")
        else:
            value = threshold
        # The training-time hint about small input sizes says nothing useful when predicting.
        size_log = logging.getLogger("transfer_learning.model.preprocessing")
        level = size_log.level
        size_log.setLevel(logging.ERROR)
        try:
            module = TransferLearningModule.load_for_inference(path, map_location="cpu")
        finally:
            size_log.setLevel(level)
        classifier = cls(module.to(resolved), threshold=value)
        if threshold == "auto" and value is not None:
            classifier.threshold_from = threshold_file(path).name
        return classifier

    def _run(
        self, inputs: Sequence[Input], batch_size: int, top_k: int, num_workers: int, progress: bool
    ) -> Iterator[tuple[int, Prediction | BadInput]]:
        """(index, prediction or problem) of every input, in batches (in input order per batch)."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}.")
        if top_k < 1:
            raise ConfigError(f"top-k must be at least 1, got {top_k}.")
        if num_workers < 0:
            raise ConfigError(f"the number of loader workers cannot be negative, got {num_workers}.")
        for i, item in enumerate(inputs):
            if not isinstance(item, str | Path | Image.Image | torch.Tensor):
                raise TypeError(
                    f"input {i}: expected a path, a PIL image or a tensor, got {type(item).__name__}"
                )
            if isinstance(item, torch.Tensor):
                check_tensor(item)
        if not inputs:
            return
        device = self.device
        k = min(top_k, len(self.class_names))
        loader = DataLoader(
            _Images(inputs, self.transform),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
        )
        bar = tqdm(
            total=len(inputs), desc="predict", unit="img", file=sys.stderr, leave=False,
            disable=not progress or not sys.stderr.isatty(),
        )  # fmt: skip
        with bar, torch.inference_mode():
            for indices, batch, failed in loader:
                for i, reason in failed:
                    yield i, BadInput(describe(inputs[i], i), reason)
                if batch is not None:
                    sources = [describe(inputs[i], i) for i in indices]
                    yield from zip(indices, self.classify(batch, sources, k), strict=True)
                bar.update(len(indices) + len(failed))

    def classify(self, batch: torch.Tensor, sources: Sequence[str], top_k: int) -> list[Prediction]:
        """The predictions of a batch already preprocessed (``self.transform``), one per row:
        the network's logits (:attr:`logits`), calibrated, then the top ``top_k`` classes
        (multi-label: the label set at the checkpoint's thresholds)."""
        with torch.inference_mode():
            logits = self.logits(batch.to(self.device, non_blocking=True))
            probs = self.module.probabilities(logits).cpu()
        if self.multilabel:
            chosen = self.module.decide(probs)
            return [self._label_set(s, row, c) for s, row, c in zip(sources, probs, chosen, strict=True)]
        top = probs.topk(min(top_k, len(self.class_names)), dim=-1)
        return [
            self._prediction(s, row, values, classes)
            for s, row, values, classes in zip(sources, probs, top.values, top.indices, strict=True)
        ]

    def _prediction(
        self, source: str, row: torch.Tensor, values: torch.Tensor, classes: torch.Tensor
    ) -> Prediction:
        ranked = [(self.class_names[c], v) for v, c in zip(values.tolist(), classes.tolist(), strict=True)]
        label, score = ranked[0]
        return Prediction(
            label=label,
            score=score,
            probabilities=dict(zip(self.class_names, row.tolist(), strict=True)),
            top_k=ranked,
            uncertain=self.threshold is not None and score < self.threshold,
            source=source,
        )

    def _label_set(self, source: str, row: torch.Tensor, chosen: Sequence[int]) -> Prediction:
        labels = [self.class_names[c] for c in chosen]
        return Prediction(
            label=" ".join(labels),
            score=float(row.max()),
            probabilities=dict(zip(self.class_names, row.tolist(), strict=True)),
            source=source,
            labels=labels,
        )

    def predict(
        self,
        images: Sequence[Input],
        batch_size: int = 32,
        top_k: int = 1,
        num_workers: int = 0,
        progress: bool = False,
    ) -> list[Prediction]:
        """One :class:`Prediction` per input, in order. An input is a path, a PIL image or a
        CHW image tensor (uint8 0..255, or float 0..1): tensors and PIL images go through the
        same decoding and preprocessing as files (to RGB, resize, crop, normalise), so a
        picture gives the same probabilities whichever way it comes. An input that cannot be
        read raises :class:`DataError` (see :meth:`predict_files` to skip it instead)."""
        results: list[Prediction | None] = [None] * len(images)
        for i, result in self._run(images, batch_size, top_k, num_workers, progress):
            if isinstance(result, BadInput):
                raise DataError(result.message())
            results[i] = result
        return [r for r in results if r is not None]

    def predict_files(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 32,
        top_k: int = 1,
        num_workers: int = 0,
        progress: bool = False,
    ) -> tuple[list[Prediction], list[BadInput]]:
        """Files, folders and glob patterns (see :func:`expand_paths`): the predictions of the
        images that could be read, in order, and the inputs that were skipped, with why."""
        files, bad, _ = expand_paths(paths)
        predictions, failed = self.predict_listed(files, batch_size, top_k, num_workers, progress)
        return predictions, bad + failed

    def predict_listed(
        self, files: Sequence[Path], batch_size: int, top_k: int, num_workers: int, progress: bool
    ) -> tuple[list[Prediction], list[BadInput]]:
        """:meth:`predict_files` on files already found (:func:`expand_paths`)."""
        results: list[Prediction | BadInput | None] = [None] * len(files)
        for i, result in self._run(files, batch_size, top_k, num_workers, progress):
            results[i] = result
        predictions = [r for r in results if isinstance(r, Prediction)]
        return predictions, [r for r in results if isinstance(r, BadInput)]


# -- output --------------------------------------------------------------------------------


def _number(p: float) -> float:
    """A float32 probability with the 9 significant digits that keep it exact."""
    return float(f"{p:.9g}")


def terminal_line(prediction: Prediction, threshold: float | None) -> str:
    """``path  label  probability  [other top-k]  [UNCERTAIN]``, tab separated, on one line:
    tabs, newlines and other control characters in names are written as escapes (``\\t``)."""
    if prediction.multilabel:  # the label set, then every class's probability
        chosen = " ".join(visible(n) for n in prediction.labels or []) or "(no label)"
        every = ", ".join(f"{visible(n)} {p:.3f}" for n, p in prediction.probabilities.items())
        return "\t".join([visible(prediction.source), chosen, every])
    fields = [visible(prediction.source), visible(prediction.label), f"{prediction.score:.3f}"]
    if len(prediction.top_k) > 1:
        fields.append("then " + ", ".join(f"{visible(n)} {p:.3f}" for n, p in prediction.top_k[1:]))
    if prediction.uncertain:
        fields.append(f"UNCERTAIN (top probability < {threshold:.3f})")
    return "\t".join(fields)


def csv_columns(class_names: Sequence[str], top_k: int, multilabel: bool = False) -> list[str]:
    if multilabel:  # the label set (names joined by a space), every probability
        return ["file", "predicted", *(f"prob_{n}" for n in class_names), "error"]
    ranks = [f"top{r}_{part}" for r in range(1, top_k + 1) for part in ("class", "prob")]
    return ["file", "predicted", "score", "uncertain", *ranks, *(f"prob_{n}" for n in class_names), "error"]


def write_csv(path: Path, predictions: Sequence[Prediction], bad: Sequence[BadInput],
              class_names: Sequence[str], top_k: int, multilabel: bool = False) -> None:  # fmt: skip
    """One row per image; then one row per skipped input, with only ``file`` and ``error``. Text
    cells that a spreadsheet would run as a formula get a leading ``'`` (:func:`csv_dict`)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(class_names, top_k, multilabel))
        writer.writeheader()
        for p in predictions:
            if p.multilabel:
                cells = {"file": p.source, "predicted": p.label, "error": ""}
                writer.writerow(
                    csv_dict({**cells, **{f"prob_{n}": f"{v:.9g}" for n, v in p.probabilities.items()}})
                )
                continue
            row: dict[str, Any] = {"file": p.source, "predicted": p.label, "score": f"{p.score:.9g}",
                                   "uncertain": str(p.uncertain).lower(), "error": ""}  # fmt: skip
            for rank, (name, prob) in enumerate(p.top_k, start=1):
                row[f"top{rank}_class"], row[f"top{rank}_prob"] = name, f"{prob:.9g}"
            row.update({f"prob_{n}": f"{v:.9g}" for n, v in p.probabilities.items()})
            writer.writerow(csv_dict(row))
        for b in bad:
            writer.writerow(csv_dict({"file": b.source, "error": b.reason}))


def prediction_record(p: Prediction) -> dict[str, Any]:
    """One prediction as JSON (the output file's entries, the server's answers): ``file``,
    ``predicted`` (the class; multi-label: the label set), ``score``, ``uncertain``, ``top_k``
    and every class's probability (multi-label: ``predicted`` and ``probabilities`` only)."""
    probabilities = {n: _number(v) for n, v in p.probabilities.items()}
    if p.multilabel:
        return {"file": p.source, "predicted": p.labels, "probabilities": probabilities}
    return {
        "file": p.source,
        "predicted": p.label,
        "score": _number(p.score),
        "uncertain": p.uncertain,
        "top_k": [{"class": n, "prob": _number(v)} for n, v in p.top_k],
        "probabilities": probabilities,
    }


def write_json(path: Path, predictions: Sequence[Prediction], bad: Sequence[BadInput],
               header: dict[str, Any]) -> None:  # fmt: skip
    data = {
        **header,
        "predictions": [prediction_record(p) for p in predictions],
        "errors": [{"file": b.source, "error": b.reason} for b in bad],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- the command ---------------------------------------------------------------------------


def auto_workers(n_files: int, batch_size: int) -> int:
    if n_files <= 2 * batch_size:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def main(argv: Sequence[str] | None = None) -> int:
    """``tl-predict``: :func:`transfer_learning.cli.predict.main` (its exit status; a mistake in
    the command line exits with 2 there)."""
    return cli_predict.main(argv)


def checkpoint_problem(checkpoint: Path, paths: Sequence[str | Path] = ()) -> str | None:
    """Why ``checkpoint`` cannot be a checkpoint (missing, a folder, not a PyTorch archive; with
    ``paths``, the images named, whether the two look swapped), or None."""
    if not checkpoint.is_file():
        swapped = [str(p) for p in paths if str(p).endswith(".ckpt") and Path(p).is_file()]
        if checkpoint.is_dir() or swapped:
            what = "a folder" if checkpoint.is_dir() else "not a file"
            hint = (
                f": ckpt_path and images look swapped; write ckpt_path={swapped[0]} images={checkpoint}"
                if swapped
                else ": give a checkpoint file (.../checkpoints/best-epochNN.ckpt) as ckpt_path"
                + (", the images as images=" if paths else "")
            )
            return f"ckpt_path={checkpoint} is {what}, not a checkpoint{hint}"
        return (
            f"checkpoint {checkpoint} does not exist (train.py writes them to "
            "logs/train/runs/<date>/checkpoints/)."
        )
    if not zipfile.is_zipfile(checkpoint):
        return (
            f"cannot read checkpoint {checkpoint}: not a complete PyTorch archive "
            "(a truncated copy, or another kind of file)."
        )
    return None


def run(args: argparse.Namespace) -> int:
    """The command, its arguments read (:func:`transfer_learning.cli.predict.parse_args`);
    returns its exit status."""
    problem = checkpoint_problem(args.checkpoint, args.paths)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        classifier = Classifier.from_checkpoint(
            args.checkpoint,
            device=args.device,
            threshold="auto" if args.threshold is None else args.threshold,
        )
        files, bad, listing = expand_paths(args.paths)
        for note in listing.notes():
            print(f"note: {note}", file=sys.stderr)
        workers = (
            args.num_workers if args.num_workers is not None else auto_workers(len(files), args.batch_size)
        )
        predictions, failed = classifier.predict_listed(files, args.batch_size, args.top_k, workers, True)
    except TransferLearningError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    bad += failed
    threshold = classifier.threshold if classifier.threshold else None
    for prediction in predictions:
        print(terminal_line(prediction, threshold), flush=False)
    sys.stdout.flush()
    for b in bad:
        print(f"error: {visible(b.message())}", file=sys.stderr)
    if args.output is not None:
        k = min(args.top_k, len(classifier.class_names))
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            if args.output.suffix.lower() == ".csv":
                write_csv(args.output, predictions, bad, classifier.class_names, k, classifier.multilabel)
            else:
                header = {"checkpoint": str(args.checkpoint), "classes": classifier.class_names,
                          "threshold": threshold, "top_k": k, "task": classifier.module.task}  # fmt: skip
                if classifier.module.thresholds is not None:
                    header["thresholds"] = [float(t) for t in classifier.module.thresholds]
                write_json(args.output, predictions, bad, header)
        except OSError as exc:
            print(f"error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    uncertain = sum(p.uncertain for p in predictions)
    summary = f"{len(predictions)} image(s) predicted on {classifier.device.type}"
    if threshold is not None:
        origin = f", from {classifier.threshold_from}" if classifier.threshold_from != "given" else ""
        summary += f", {uncertain} uncertain (top probability < {threshold:.3f}{origin})"
    if bad:
        summary += f", {len(bad)} input(s) skipped"
    if args.output is not None:
        summary += f"; wrote {args.output}"
    if args.explain is not None and predictions:
        from transfer_learning.results.explain import explain_predictions

        try:
            written = explain_predictions(classifier.module, predictions, args.explain, args.batch_size, True)
        except (OSError, TransferLearningError) as exc:  # an image changed since, a folder not writable
            print(f"error: cannot write the explanations to {args.explain}: {exc}", file=sys.stderr)
            return 2
        summary += f"; Grad-CAM of {len(written)} image(s) in {args.explain}"
    print(summary, file=sys.stderr)
    return 1 if bad or not predictions else 0
