"""Evaluate a trained checkpoint exactly, on one device: `python eval.py
ckpt_path=<run>/checkpoints/<file>.ckpt [data.root=<folder>] [split=test|val|train|all] [tta=flip]`.

Configs live in conf/ (eval.yaml); every option can be overridden on the command line (Hydra).
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from transfer_learning.run.config import expand_overrides
from transfer_learning.run.sweeps import run_task


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from transfer_learning.results.evaluate import evaluate  # torch: not needed for --help

    return run_task(cfg, evaluate)


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", os.getcwd())
    sys.argv = expand_overrides(sys.argv)
    main()
