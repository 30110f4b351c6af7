"""What an export is asked to do: ``tl-export``'s settings, read by its command line
(:mod:`transfer_learning.cli.export`) and carried out by :mod:`transfer_learning.results.export`.
Plain values, no torch: the command line answers ``--help`` before torch loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
# Measured on EfficientNet-Lite0 and ResNet-18 checkpoints (CPU, float32): the exported files'
# logits differ from PyTorch's by up to ~1e-4 (ONNX Runtime fuses and reorders operations),
# TorchScript by ~1e-6. 1e-3 leaves room for larger backbones and other CPUs.
DEFAULT_ATOL = 1e-3
DEFAULT_MAX_IMAGES = 8
DEMO_IMAGES = Path("data") / "demo_shapes"


@dataclass(frozen=True)
class ExportArgs:
    ckpt_path: Path
    format: str = "onnx"
    output: Path | None = None
    images: tuple[str, ...] = ()
    max_images: int = DEFAULT_MAX_IMAGES
    atol: float = DEFAULT_ATOL

    @property
    def output_path(self) -> Path:
        if self.output is not None:
            return self.output
        return self.ckpt_path.with_name(self.ckpt_path.stem + FORMATS[self.format])
