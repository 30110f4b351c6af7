"""Train a transfer-learning image classifier: `python train.py strategy=feature_extract`.

Configs live in conf/; every option can be overridden on the command line (Hydra).
"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from transfer_learning.config import expand_overrides
from transfer_learning.errors import find_user_error


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from transfer_learning.train import train  # torch, Lightning: not needed for --help

    try:
        metrics = train(cfg)
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        logging.getLogger("train").error(
            "%s\n(Outputs written so far are kept in %s)", user_error, cfg.paths.output_dir
        )
        sys.exit(2)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return float(value) if value is not None else None


if __name__ == "__main__":
    # paths.root_dir: the folder the command runs from, fixed before Hydra resolves its run and
    # sweep folders (and inherited by DDP worker processes, which re-run this command).
    os.environ.setdefault("PROJECT_ROOT", os.getcwd())
    sys.argv = expand_overrides(sys.argv)
    main()
