"""``tl-eval`` and ``python eval.py``: evaluate a trained checkpoint exactly, on one device,
``tl-eval ckpt_path=<run>/checkpoints/<file>.ckpt [data.root=<folder>] [split=test|val|train|all]
[tta=flip]``. Every option of ``conf/eval.yaml`` can be overridden (Hydra)."""

from __future__ import annotations

from omegaconf import DictConfig

from transfer_learning.cli.hydra_entry import launch
from transfer_learning.run.sweeps import run_task


def task(cfg: DictConfig) -> float | None:
    """The evaluation; returns the optimised metric (for sweeps over checkpoints or settings)."""
    from transfer_learning.results.evaluate import evaluate  # torch: not needed for --help

    return run_task(cfg, evaluate)


def main() -> None:
    launch("eval", task, positional=("ckpt_path",))  # python eval.py best.ckpt: ckpt_path=best.ckpt


if __name__ == "__main__":
    main()
