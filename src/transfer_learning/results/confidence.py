"""How far a headline number on a small split could move: 95 % intervals.

Accuracy (and multi-label exact match) is a share of images right, so its interval is exact
enough in closed form: the Wilson score interval, which stays inside [0, 1] and is not
degenerate at 0 or n right (the normal approximation gives [1, 1] for 60 of 60). On 60 test
images an accuracy of 0.98 reads as 0.911-0.997: differences between runs smaller than that
are noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist

LEVEL = 0.95
# The shares whose intervals the run summary and eval give: summary key -> what it counts.
SHARES = {"test/acc": "single-label", "test/exact_match": "multilabel"}


def wilson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (nan, nan without images)."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact ends: no rounding past them
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def share_intervals(metrics: Mapping[str, float | None], images: int) -> dict[str, list[float]]:
    """``<key>_ci95: [low, high]`` for each share among :data:`SHARES` in ``metrics``, measured
    on ``images`` images (the count right is the share times the images, rounded)."""
    out = {}
    for key in SHARES:
        value = metrics.get(key)
        if value is not None and images > 0:
            out[f"{key}_ci95"] = list(wilson(round(float(value) * images), images))
    return out


def format_interval(bounds: list[float], images: int) -> str:
    """``[0.911, 0.997] (Wilson, 60 images)``: the 95 % interval, as printed."""
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}] (Wilson, {images} images)"
