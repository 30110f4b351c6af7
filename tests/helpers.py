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
import torch
from forkrun import run_python
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch.nn.modules.batchnorm import _NormBase

from transfer_learning.data.datamodule import ImageFolderDataModule
from transfer_learning.model.module import TransferLearningModule
from transfer_learning.run.config import build as build_from_config
from transfer_learning.run.config import compose_config

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
            f"input.image_size={image_size}",
            f"data.batch_size={batch_size}",
            "data.num_workers=0",
            "data.verify_images=false",
            *overrides,
        ]
    )
    datamodule, module = build_from_config(cfg)
    return module, datamodule


class RecordTraining(Callback):
    """At every training batch (after the module's own hooks have set the epoch up): each param
    group's learning rate, and per backbone block whether all its parameters require gradients,
    whether all its modules are in training mode, and the mode of each of its BatchNorm layers.
    After every epoch: a copy of each block's parameters and buffers (BatchNorm statistics)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.after_epoch: list[dict[str, list[Any]]] = []

    @staticmethod
    def _blocks(pl_module: L.LightningModule) -> list[tuple[str, Any]]:
        from transfer_learning.model.network import backbone_blocks

        return backbone_blocks(pl_module.net.backbone)  # type: ignore[attr-defined]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        blocks = self._blocks(pl_module)
        self.batches.append({
            "epoch": trainer.current_epoch,
            "batch": batch_idx,
            "lr": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
            "grad": {n: all(p.requires_grad for p in m.parameters()) for n, m in blocks},
            "train": {n: all(x.training for x in m.modules()) for n, m in blocks},
            "norm_train": {n: [x.training for x in m.modules() if isinstance(x, _NormBase)]
                           for n, m in blocks},
        })  # fmt: skip

    def on_train_epoch_end(self, trainer, pl_module):
        self.after_epoch.append(snapshot(pl_module))

    def epochs(self) -> list[dict[str, Any]]:
        """The first batch of each epoch."""
        return [b for b in self.batches if b["batch"] == 0]


def snapshot(pl_module: L.LightningModule) -> dict[str, list[Any]]:
    """Each backbone block's parameters and buffers, copied."""
    return {
        n: [t.detach().clone() for t in [*m.parameters(), *m.buffers()]]
        for n, m in RecordTraining._blocks(pl_module)
    }


def same(a: list[Any], b: list[Any]) -> bool:
    import torch

    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


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
    return run_python(
        [
            REPO / "train.py",
            *(["--multirun"] if multirun else []),
            f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/run",
            "data.num_workers=0",
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
    )


def finished_run(tmp_path: Path, *overrides: str) -> Path:
    """The run folder of a `python train.py` run (:func:`run_cli`) that must succeed."""
    result = run_cli(tmp_path, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "run"


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


def train_cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python train.py <args>` exactly as typed in ``cwd``: no path is overridden, so the outputs
    land under ``cwd/logs`` where a user's would."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    environment.pop("PROJECT_ROOT", None)
    return run_python([REPO / "train.py", *args], cwd=cwd, env=environment, timeout=900)


def sweep_dirs(cwd: Path) -> list[Path]:
    """The multirun folders under ``cwd/logs``, oldest first."""
    return sorted((cwd / "logs" / "train" / "multiruns").iterdir())


def read_sweep_table(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "sweep_results.csv") as f:
        return list(csv.DictReader(f))


def read_wandb_run(run_dir: Path) -> dict[str, Any]:
    """An offline W&B run read back with wandb's own reader (`wandb leet inspect --json`): the
    run record (last one: tags, group, name), the merged config, every history row, the
    artifacts, the tables the run logged (by key) and the staged files they refer to (by path)."""
    (log_file,) = run_dir.glob("run-*.wandb")
    wandb_cli = Path(sys.executable).parent / "wandb"
    result = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(log_file)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    run: dict[str, Any] = {}
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    artifacts: list[dict[str, Any]] = []
    for line in result.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        kind = record.get("type")
        if kind == "run":
            run = record["run"]
            config.update(run.get("config", {}).get("update", {}))
        elif kind == "config":
            config.update(record["config"].get("update", {}))
        elif kind == "history":
            history.append(record["history"]["item"])
        elif kind == "artifact":
            artifacts.append(record["artifact"])
    # Tables travel as run_table artifacts (with the pictures they show), staged until synced.
    tables, files = {}, {}
    for artifact in artifacts:
        for entry in artifact.get("manifest", {}).get("contents", []):
            files[entry["path"]] = Path(entry["local_path"])
            if artifact.get("type") == "run_table" and entry["path"].endswith(".table.json"):
                tables[entry["path"].removesuffix(".table.json")] = json.loads(
                    Path(entry["local_path"]).read_text()
                )
    return {"run": run, "config": config, "history": history, "tables": tables, "artifacts": artifacts,
            "files": files}  # fmt: skip


def confusion_counts(run_dir: Path) -> list[list[int]]:
    """The test confusion matrix a run saved (confusion_matrix.csv): true classes down."""
    with open(run_dir / "confusion_matrix.csv") as f:
        return [[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]]


def assert_same_weights(run: Path, reference: Path) -> None:
    """The two runs' ``checkpoints/last.ckpt`` hold the same weights (float tensors within 1e-5);
    with weight averaging, also the same weights being trained (``current_model_state``)."""
    from transfer_learning.run.checkpoints import safe_load

    final_checkpoint = safe_load(run / "checkpoints" / "last.ckpt")
    expected_checkpoint = safe_load(reference / "checkpoints" / "last.ckpt")
    for part in ("state_dict", "current_model_state"):
        assert (part in final_checkpoint) == (part in expected_checkpoint), part
        if part not in expected_checkpoint:
            continue
        final, expected = final_checkpoint[part], expected_checkpoint[part]
        assert final.keys() == expected.keys()
        for key, value in expected.items():
            if value.is_floating_point():
                assert torch.allclose(final[key], value, atol=1e-5, rtol=1e-4), (part, key)
            else:
                assert torch.equal(final[key], value), (part, key)


def best_checkpoint(run: Path) -> Path:
    """The best-*.ckpt file of a run folder (or of a copy of one)."""
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    return best
