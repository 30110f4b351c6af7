"""`ckpt_path=last` and resuming a run in its own folder (a Hydra callback).

Before Hydra makes a new run folder, a command that resumes from a checkpoint of an earlier
run (``ckpt_path=last``: the newest ``checkpoints/last.ckpt`` under ``logs/<task>/runs``; or
any ``.../<run>/checkpoints/<file>.ckpt``) is pointed back at that run's folder: one CSV
history (continued, see :class:`transfer_learning.run.loggers.CSVLogger`), one train.log, and the
same W&B run id.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from transfer_learning.run.config import expand_path


def latest_checkpoint(runs: Path) -> Path | None:
    found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/<file>``), if it is one."""
    folder = checkpoint.parent.parent
    return folder if checkpoint.parent.name == "checkpoints" and (folder / ".hydra").is_dir() else None


def wandb_run_id(folder: Path) -> str | None:
    """The id of the newest W&B run kept in a run folder (``wandb/[offline-]run-<date>-<id>``)."""
    runs = sorted((folder / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


class ResumeRun(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        requested = config.get("ckpt_path")
        if not requested or not config.get("run_folder_from_checkpoint", True):
            return  # eval.py reads checkpoints; it never writes into their runs
        explicit_dir = any(
            o.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for o in config.hydra.overrides.hydra
        )
        if str(requested) == "last":
            own = Path(str(config.hydra.run.dir)) / "checkpoints" / "last.ckpt"
            runs = Path(expand_path(str(config.paths.log_dir))) / str(config.task_name) / "runs"
            checkpoint = own if explicit_dir and own.is_file() else latest_checkpoint(runs)
            if checkpoint is None:
                print(
                    f"Error: ckpt_path=last, but no run under {runs} has a checkpoints/last.ckpt. "
                    "Train first, or give the checkpoint's path.",
                    file=sys.stderr,
                )
                sys.exit(2)
        else:
            checkpoint = Path(expand_path(str(requested)))
        checkpoint = checkpoint.absolute()
        folder = run_folder_of(checkpoint) if checkpoint.is_file() else None
        with read_write(config), open_dict(config):
            config.ckpt_path = str(checkpoint)
            if folder is None or os.environ.get("LOCAL_RANK", "0") != "0":
                return  # a checkpoint from elsewhere trains into a new folder; DDP workers are told theirs
            if not explicit_dir:
                config.hydra.run.dir = str(folder)
            wandb = config.get("logger", {}).get("wandb") if config.get("logger") else None
            run_id = wandb_run_id(folder)
            if wandb is not None and run_id and not wandb.get("id"):
                wandb.id = run_id
                wandb.resume = "allow"
