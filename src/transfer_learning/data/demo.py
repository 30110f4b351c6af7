"""The demo data set: coloured shapes on noisy backgrounds, written as real JPEG files.

It exists so that `python train.py` works on a fresh clone with no network and no data,
while still being a task where ImageNet features help: shapes vary in colour, size,
position and rotation, so the classifier has to see the outline, not a colour.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "cross", "square", "star", "triangle")
SHAPES = (*CLASSES, "hexagon")
BOXES = "boxes.csv"  # generate_shapes: the box around each image's shape  # every kind draw_shape knows


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif kind == "triangle":
        corners = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif kind == "hexagon":
        corners = [(k * math.pi / 3, r) for k in range(6)]
    elif kind == "star":
        corners = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else r * 0.42) for k in range(10)]
    else:  # cross: a plus sign with arms a third of the size wide
        w = r / 3
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
               (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]  # fmt: skip
        corners = [(math.atan2(y, x), math.hypot(x, y)) for x, y in pts]
    return [(cx + d * math.cos(a + angle), cy + d * math.sin(a + angle)) for a, d in corners]


def _colours(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A foreground colour that stands out from ``background``."""
    while True:
        foreground = rng.integers(0, 256, 3)
        if np.abs(foreground.astype(int) - background.astype(int)).sum() > 180:
            return int(foreground[0]), int(foreground[1]), int(foreground[2])


def _canvas(size: int, rng: np.random.Generator, background: np.ndarray) -> Image.Image:
    pixels = np.empty((size, size, 3), np.float32)
    pixels[:] = background
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _paint(image: Image.Image, kind: str, cx: float, cy: float, r: float, fill: tuple, angle: float) -> None:
    if kind not in SHAPES:
        raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of ``kind`` with random colours, placement, size, rotation and noise."""
    return draw_shape_in_box(kind, size, rng)[0]


def draw_shape_in_box(
    kind: str, size: int, rng: np.random.Generator
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """:func:`draw_shape`'s image and the box ``(x0, y0, x1, y1)`` in pixels that holds the shape."""
    if kind not in SHAPES:
        raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")
    background = rng.integers(0, 256, 3)
    fill = _colours(rng, background)
    image = _canvas(size, rng, background)
    r = size * rng.uniform(0.2, 0.38)
    cx, cy = rng.uniform(r, size - r, 2)
    angle = 0.0 if kind == "circle" else rng.uniform(0, 2 * math.pi)  # a circle draws no angle
    _paint(image, kind, cx, cy, r, fill, angle)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8))), (cx - r, cy - r, cx + r, cy + r)


def draw_shapes(kinds: list[str], size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image with each of ``kinds`` (up to four) in its own quarter of the picture."""
    background = rng.integers(0, 256, 3)
    image = _canvas(size, rng, background)
    half = size / 2
    for kind, cell in zip(kinds, rng.permutation(4), strict=False):
        r = half * rng.uniform(0.3, 0.45)
        x0, y0 = (cell % 2) * half, (cell // 2) * half
        cx, cy = x0 + rng.uniform(r, half - r), y0 + rng.uniform(r, half - r)
        _paint(image, kind, cx, cy, r, _colours(rng, background), rng.uniform(0, 2 * math.pi))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))


def _write_once(root: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(folder)`` into a temporary folder renamed to ``root``, unless ``root`` exists:
    concurrent callers (one per DDP process) never see a half-written data set."""
    root = Path(root).expanduser()
    if root.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        write(tmp)
        os.rename(tmp, root)
    except OSError:
        if not root.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def generate_multilabel_shapes(
    root: str | Path,
    images: int = 600,
    image_size: int = 96,
    seed: int = 0,
    classes: tuple[str, ...] | list[str] = CLASSES,
    max_labels: int = 3,
) -> Path:
    """Write ``root/images/<n>.jpg`` with 1 to ``max_labels`` different shapes each, and
    ``root/labels.csv`` (columns ``path``, ``labels``: the shapes, separated by spaces), unless
    ``root`` exists."""
    rng = np.random.default_rng(seed)

    def write(folder: Path) -> None:
        (folder / "images").mkdir()
        rows = ["path,labels"]
        for n in range(images):
            count = int(rng.integers(1, max_labels + 1))
            kinds = sorted(rng.choice(list(classes), size=count, replace=False).tolist())
            draw_shapes(kinds, image_size, rng).save(folder / "images" / f"{n:04d}.jpg", quality=92)
            rows.append(f"images/{n:04d}.jpg,{' '.join(kinds)}")
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")

    return _write_once(root, write)


def generate_shapes(
    root: str | Path,
    images_per_class: int = 60,
    image_size: int = 96,
    seed: int = 0,
    classes: tuple[str, ...] | list[str] = CLASSES,
    boxes: bool = False,
) -> Path:
    """Write ``root/<class>/<n>.jpg`` unless ``root`` exists; with ``boxes``, also
    ``root/boxes.csv``: where each shape is (``path,x0,y0,x1,y1``, pixels; to check what an
    explanation points at). The images are the same either way."""
    rng = np.random.default_rng(seed)

    def write(folder: Path) -> None:
        rows = ["path,x0,y0,x1,y1"]
        for kind in classes:
            (folder / kind).mkdir()
            for n in range(images_per_class):
                image, box = draw_shape_in_box(kind, image_size, rng)
                image.save(folder / kind / f"{n:04d}.jpg", quality=92)
                rows.append(f"{kind}/{n:04d}.jpg," + ",".join(f"{v:.1f}" for v in box))
        if boxes:
            (folder / BOXES).write_text("\n".join(rows) + "\n")

    return _write_once(root, write)
