"""Train a transfer-learning image classifier: `python train.py strategy=feature_extract`
(installed as the console script `tl-train`).

Configs live in conf/; every option can be overridden on the command line (Hydra). The command
itself is transfer_learning.cli.train, shared with `tl-train`.
"""

from transfer_learning.cli.train import main

if __name__ == "__main__":
    main()
