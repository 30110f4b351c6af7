"""Learning-rate schedules as one multiplier on every param group's rate.

Both keep the ratios between param groups (discriminative rates: backbone against head, block
against block), which torch's own ``OneCycleLR`` would not: it sets every group to one
``max_lr``. ``conf/scheduler/*.yaml`` name them; any ``torch.optim.lr_scheduler`` class works
there as well.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1
) -> LambdaLR:
    """Linear warm-up, then cosine decay to zero. One multiplier for every group, so the
    ratio between the backbone's and the head's learning rate holds throughout."""
    warmup = max(1, int(total_steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def one_cycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> LambdaLR:
    """The one-cycle policy (Smith; fastai's ``fit_one_cycle``) as one multiplier on every group's
    rate: cosine from ``1/div_factor`` up to 1 over the first ``pct_start`` of the steps, then
    cosine down to ``1/(div_factor * final_div_factor)``."""
    warmup = max(1, int(total_steps * pct_start))
    low, end = 1 / div_factor, 1 / (div_factor * final_div_factor)

    def factor(step: int) -> float:
        if step < warmup:
            return low + (1 - low) * 0.5 * (1 - math.cos(math.pi * step / warmup))
        progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
