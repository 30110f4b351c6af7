"""Export a trained checkpoint to ONNX or TorchScript and check it against PyTorch.

    python scripts/export.py ckpt_path=logs/train/runs/<date>/checkpoints/best-<...>.ckpt format=onnx

See `python scripts/export.py --help` and transfer_learning/export.py.
"""

from __future__ import annotations

from transfer_learning.results.export import main

if __name__ == "__main__":
    main()
