"""Predict with a trained checkpoint: `python -m transfer_learning.predict CKPT IMAGE...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from transfer_learning.data import build_transforms, load_rgb
from transfer_learning.errors import TransferLearningError
from transfer_learning.module import TransferLearningModule


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    probabilities: dict[str, float]


class Classifier:
    """A checkpoint turned into a callable: images in, class names and probabilities out."""

    def __init__(self, module: TransferLearningModule) -> None:
        self.module = module.eval()
        self.class_names = module.class_names
        self.transform = build_transforms(module.preprocessing, train=False, augment={})

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Classifier:
        return cls(TransferLearningModule.load_for_inference(path, map_location=device))

    @torch.inference_mode()
    def predict(self, images: Sequence[str | Path | Image.Image]) -> list[Prediction]:
        device = next(self.module.parameters()).device
        batch = torch.stack(
            [self.transform(img if isinstance(img, Image.Image) else load_rgb(str(img))) for img in images]
        )
        probs = self.module(batch.to(device)).softmax(dim=-1).cpu()
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append(
                Prediction(
                    label=self.class_names[best],
                    score=float(row[best]),
                    probabilities={n: float(p) for n, p in zip(self.class_names, row, strict=True)},
                )
            )
        return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        classifier = Classifier.from_checkpoint(args.checkpoint)
        predictions = classifier.predict(args.images)
    except TransferLearningError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for path, pred in zip(args.images, predictions, strict=True):
        print(f"{path}\t{pred.label}\t{pred.score:.3f}")


if __name__ == "__main__":
    main()
