"""Train a transfer-learning image classifier: `python train.py strategy=feature_extract`.

Configs live in conf/; every option can be overridden on the command line (Hydra).
"""

import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

from transfer_learning.run.config import expand_overrides
from transfer_learning.run.sweeps import run_task


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """One run, or one job of a multirun; returns the optimised metric for sweepers."""
    from transfer_learning.run.train import train  # torch, Lightning: not needed for --help

    return run_task(cfg, train)


if __name__ == "__main__":
    # paths.root_dir: the folder the command runs from, fixed before Hydra resolves its run and
    # sweep folders (and inherited by DDP worker processes, which re-run this command).
    os.environ.setdefault("PROJECT_ROOT", os.getcwd())
    sys.argv = expand_overrides(sys.argv)
    # conf/hydra/launcher/submitit_*.yaml set this template's defaults on top of the submitit
    # plugin's schema of the same name; Hydra validates them against it and says so each time.
    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")
    main()
