"""Pictures of images in a grid, each with its caption: the validation images the model gets
most wrong (the run's report), the likeliest label issues of a ``cv=K`` run."""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transfer_learning.data.images import load_rgb  # regular files only, never more than their size
from transfer_learning.errors import DataError
from transfer_learning.plotting import pyplot, save_figure

log = logging.getLogger(__name__)


def _why(exc: BaseException) -> str:
    """Why an image could not be opened, in one line."""
    cause = exc.__cause__ or exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def plot_confident_mistakes(
    worst: Sequence[Mapping[str, Any]],
    path: Path,
    limit: int = 16,
    skipped: list[tuple[str, str]] | None = None,
    explain: Callable[[list[Mapping[str, Any]], list[Any]], list[Any]] | None = None,
) -> Path | None:
    """The validation images predicted wrong with the highest confidence, in a grid, each with
    its true and predicted class and the confidence. An image that cannot be opened any more is
    left out (the next one takes its place) and added to ``skipped`` as (file, why); None when
    there is nothing to draw. ``explain(rows, images)``: a Grad-CAM heatmap per image (its
    size, 0..1), drawn over it."""
    wrong = sorted((r for r in worst if not r["correct"]), key=lambda r: -float(r["confidence"]))
    drawn = _open_images(wrong, limit, skipped)
    if not drawn:
        return None
    if explain is not None:
        from transfer_learning.results.explain import overlay

        try:
            heatmaps = explain([row for row, _ in drawn], [image for _, image in drawn])
            drawn = [(row, overlay(image, heat)) for (row, image), heat in zip(drawn, heatmaps, strict=True)]
        except Exception as exc:  # a backbone Grad-CAM cannot read: the grid without heatmaps, the run kept
            log.warning("The report's grid has no Grad-CAM heatmaps: %s", exc)
            explain = None
    title = "Most confidently wrong validation images"
    # Multi-label rows name the class of their worst call (a false positive or a missed label).
    target = "the worst call's class" if "worst_class" in drawn[0][0] else "the predicted class"
    title += f" (Grad-CAM of {target}: red)" if explain else ""
    captions = [
        f"true: {row['true'] or '(none)'}\npredicted: {row['predicted'] or '(none)'} "
        f"({float(row['confidence']):.0%})" + (f"\nheatmap: {row['worst_class']}" if explain and
                                                "worst_class" in row else "")
        for row, _ in drawn
    ]  # fmt: skip
    return _draw_grid([(c, image) for c, (_, image) in zip(captions, drawn, strict=True)], title, path)


def plot_image_grid(
    items: Sequence[tuple[str, str]], title: str, path: Path, limit: int = 16,
    skipped: list[tuple[str, str]] | None = None,
) -> Path | None:  # fmt: skip
    """Images (``(file, caption)``, the first ``limit`` that open) in a grid under ``title``; an
    image that cannot be opened any more is left out (and added to ``skipped``); None when there
    is nothing to draw."""
    drawn = _open_images([{"file": f, "caption": c} for f, c in items], limit, skipped)
    return _draw_grid([(row["caption"], image) for row, image in drawn], title, path) if drawn else None


def _open_images(
    rows: Sequence[Mapping[str, Any]], limit: int, skipped: list[tuple[str, str]] | None
) -> list[tuple[Mapping[str, Any], Any]]:
    """The first ``limit`` rows whose ``file`` opens, each with its image (thumbnail)."""
    drawn: list[tuple[Mapping[str, Any], Any]] = []
    for row in rows:
        if len(drawn) == limit:
            break
        try:
            image = load_rgb(row["file"])
            image.thumbnail((640, 640))  # drawn 320 px wide: no need to hold 16 full-size photos
            drawn.append((row, image))
        except DataError as exc:
            if skipped is not None:
                skipped.append((str(row["file"]), _why(exc)))
    return drawn


def _draw_grid(drawn: Sequence[tuple[str, Any]], title: str, path: Path) -> Path:
    """``(caption, image)`` pairs in a grid of four columns under ``title``, saved to ``path``."""
    import numpy as np
    from PIL import Image

    plt = pyplot()
    columns = min(4, len(drawn))
    lines = math.ceil(len(drawn) / columns)
    # Each cell (inches): its image fitted into a fixed box, with room above the box for a title
    # of up to three lines, so no title can reach the image above it whatever the photos'
    # shapes. The images are placed as pixels and the titles as figure text: axes and a layout
    # engine would cost most of the run's report time for no visible difference.
    dpi, cell_w, cell_h, title_h, pad = 100, 3.2, 3.7, 0.62, 0.08
    # The picture's title in lines that fit its width (13 pt: ~9.5 characters an inch).
    title_lines = textwrap.wrap(title, width=max(20, int(cell_w * columns * 9.5)))
    top_h = 0.31 + 0.24 * len(title_lines)
    width, height = cell_w * columns, cell_h * lines + top_h
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    box_w, box_h = round((cell_w - 2 * pad) * dpi), round((cell_h - title_h - 2 * pad) * dpi)
    for i, (caption, image) in enumerate(drawn):
        line, column = divmod(i, columns)
        scale = min(box_w / image.width, box_h / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        # Small images blown up show their pixels (as imshow would), photos are scaled down smoothly.
        resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
        shown = image.convert("RGB").resize(size, resample)
        left = round((column * cell_w + pad) * dpi) + (box_w - shown.width) // 2
        bottom = round(((lines - 1 - line) * cell_h + pad) * dpi) + box_h - shown.height  # at the box's top
        fig.figimage(np.asarray(shown), xo=left, yo=bottom, origin="upper")
        title_y = ((lines - 1 - line) * cell_h + pad + box_h / dpi + 0.05) / height
        fig.text(
            (column + 0.5) * cell_w / width, title_y, caption,
            fontsize=9, color="firebrick", ha="center", va="bottom", parse_math=False,
        )  # fmt: skip
    fig.suptitle("\n".join(title_lines), fontsize=13, y=1 - 0.12 / height, va="top")
    return save_figure(fig, path, plt)
