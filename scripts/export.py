"""Export a trained checkpoint to ONNX or TorchScript and check it against PyTorch.

    python scripts/export.py ckpt_path=logs/train/runs/<date>/checkpoints/best-<...>.ckpt format=onnx

The same command is installed as `tl-export`. See `python scripts/export.py --help` and
transfer_learning/results/export.py.
"""

from __future__ import annotations

from transfer_learning.cli.export import main  # torch loads after the command line is read

if __name__ == "__main__":
    main()
