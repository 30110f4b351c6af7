"""Running the model: a checkpoint loaded on a device as a :class:`Classifier` (images in,
:class:`Prediction` out), in batches, calibrated, with the top-k classes or the label set; and
the confidence threshold that marks a prediction ``uncertain`` (given, or read from
``<checkpoint stem>.threshold.json`` next to the checkpoint)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from transfer_learning.data.transforms import build_transforms
from transfer_learning.errors import ConfigError, DataError
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.preprocessing import size_hints_off
from transfer_learning.readers import json_field
from transfer_learning.results.predict.inputs import (
    BadInput,
    Input,
    _collate,
    _Images,
    check_tensor,
    describe,
    expand_paths,
)

THRESHOLD_KEY = "max_softmax_threshold"


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
        with size_hints_off():
            module = TransferLearningModule.load_for_inference(path, map_location="cpu")
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
