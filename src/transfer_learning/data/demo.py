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
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "cross", "square", "star", "triangle")
SHAPES = (*CLASSES, "hexagon")  # every kind draw_shape knows


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


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of ``kind`` with random colours, placement, size, rotation and noise."""
    if kind not in SHAPES:
        raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")
    background = rng.integers(0, 256, 3)
    while True:  # a foreground that stands out from the background
        foreground = rng.integers(0, 256, 3)
        if np.abs(foreground.astype(int) - background.astype(int)).sum() > 180:
            break
    pixels = np.empty((size, size, 3), np.float32)
    pixels[:] = background
    pixels += rng.normal(0, 12, pixels.shape)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.2, 0.38)
    cx, cy = rng.uniform(r, size - r, 2)
    fill = (int(foreground[0]), int(foreground[1]), int(foreground[2]))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fill)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def generate_shapes(
    root: str | Path,
    images_per_class: int = 60,
    image_size: int = 96,
    seed: int = 0,
    classes: tuple[str, ...] | list[str] = CLASSES,
) -> Path:
    """Write ``root/<class>/<n>.jpg`` unless ``root`` exists.

    Files are written to a temporary folder and renamed into place, so concurrent callers
    (one per DDP process) never see a half-written data set.
    """
    root = Path(root).expanduser()
    if root.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for kind in classes:
            (tmp / kind).mkdir()
            for n in range(images_per_class):
                draw_shape(kind, image_size, rng).save(tmp / kind / f"{n:04d}.jpg", quality=92)
        os.rename(tmp, root)
    except OSError:
        if not root.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
