"""``tl-train`` and ``python train.py``: train a transfer-learning image classifier,
``tl-train strategy=feature_extract``. Every option of ``conf/`` can be overridden (Hydra)."""

from __future__ import annotations

from omegaconf import DictConfig

from transfer_learning.cli.hydra_entry import launch
from transfer_learning.run.sweeps import run_task


def task(cfg: DictConfig) -> float | None:
    """One run, or one job of a multirun; returns the optimised metric for sweepers."""
    from transfer_learning.pipelines.train import train  # torch, Lightning: not needed for --help

    return run_task(cfg, train)


def main() -> None:
    launch("train", task)


if __name__ == "__main__":
    main()
