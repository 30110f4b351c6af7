"""Pictures written to files, on any machine: no display needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, plt: Any, **savefig: Any) -> Path:
    """``fig`` written to ``path`` (its folder made; ``savefig``: e.g. ``dpi``), then closed;
    returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **savefig)
    plt.close(fig)
    return path
