"""Evaluate a trained checkpoint exactly, on one device: `python eval.py
ckpt_path=<run>/checkpoints/<file>.ckpt [data.root=<folder>] [split=test|val|train|all] [tta=flip]`
(installed as the console script `tl-eval`).

Configs live in conf/ (eval.yaml); every option can be overridden on the command line (Hydra).
The command itself is transfer_learning.cli.eval, shared with `tl-eval`.
"""

from transfer_learning.cli.eval import main

if __name__ == "__main__":
    main()
