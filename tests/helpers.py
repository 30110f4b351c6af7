"""Shared by the tests: the module and data module built from the real YAML, and a quiet Trainer."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from PIL import Image

from transfer_learning.config import build as build_from_config
from transfer_learning.config import compose_config
from transfer_learning.data import ImageFolderDataModule
from transfer_learning.module import TransferLearningModule

REPO = Path(__file__).resolve().parents[1]


def build(
    root: Path, *overrides: str, image_size: int = 32, batch_size: int = 8
) -> tuple[TransferLearningModule, ImageFolderDataModule]:
    """``python train.py data=imagefolder data.root=<root> <overrides>``'s two objects, composed
    from conf/ and built by the one build path; tiny images, no loader workers."""
    cfg = compose_config(
        [
            "data=imagefolder",
            f"data.root={root}",
            f"data.image_size={image_size}",
            f"data.batch_size={batch_size}",
            "data.num_workers=0",
            "data.verify_images=false",
            *overrides,
        ]
    )
    datamodule, module = build_from_config(cfg)
    return module, datamodule


def trainer(callbacks: Sequence[Callback] = (), **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 1,
        **kwargs,
    }
    return L.Trainer(callbacks=list(callbacks), **options)


def run_cli(
    tmp_path: Path, *overrides: str, multirun: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python train.py` in ``tmp_path``, with its outputs in ``tmp_path/run``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *(["--multirun"] if multirun else []),
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/run",
            "data.num_workers=0",
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_run(tmp_path: Path, result: subprocess.CompletedProcess[str], strategy: str) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Run summary" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == strategy
    for key in ("best val/acc", "test/acc", "test/f1"):
        assert 0.0 <= summary[key] <= 1.0, key
    checkpoint = Path(summary["best checkpoint"])
    assert checkpoint.is_file() and checkpoint.parent == tmp_path / "run" / "checkpoints"
    assert Image.open(summary["confusion matrix"]).size[0] > 100
    with open(summary["CSV metrics"]) as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("val/acc") for row in rows) and any(row.get("test/acc") for row in rows)
    return summary
