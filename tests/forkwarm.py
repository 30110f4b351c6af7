"""Imported once by the tests' forkserver (see forkrun.PRELOAD), after the packages: the work
every forked run would otherwise repeat on first use, done once in the parent it is forked from.

- W&B imports its launch package (about 1 s) when a run starts, to look for staged launch inputs.
- matplotlib reads its font list and lays out text the first time a figure is drawn (about 0.5 s).
"""

from __future__ import annotations

import gc
import io

import wandb.sdk.launch.inputs.internal  # noqa: F401

from transfer_learning.plotting import pyplot

_plt = pyplot()
_figure, _axes = _plt.subplots(figsize=(2, 2))
_axes.set_title("warm")
_figure.tight_layout()
_figure.savefig(io.BytesIO(), format="png")
_plt.close(_figure)

# Everything imported above lives as long as the forkserver: out of the collector's sight
# (gc.freeze), so no forked run walks (and copies on write) these objects in a full collection.
gc.freeze()
