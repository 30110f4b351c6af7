"""Experiment loggers: W&B that never hangs on a machine without network or login, and the
few things the training run asks of its loggers (where they write, a picture, closing)."""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    """True when an API key is at hand (env var or ~/.netrc), without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        path = os.environ.get("NETRC", str(Path.home() / ".netrc"))
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; otherwise online if logged in, else offline."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if wandb_logged_in() else "offline"


def wandb_logger(**kwargs: Any) -> WandbLogger:
    """A WandbLogger that runs offline (never prompting for a login) unless W&B is set up."""
    mode = wandb_mode()
    if mode != "online" and "WANDB_MODE" not in os.environ:
        log.info("No W&B login found: logging offline. Upload later with `wandb sync <run dir>`.")
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
    return WandbLogger(offline=mode in ("offline", "dryrun"), mode=mode, **kwargs)


def logger_locations(loggers: Sequence[Logger]) -> dict[str, str]:
    """Where each logger wrote, for the run summary; only places that exist."""
    where = {}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run_dir = str(Path(run.dir).parent)  # run.dir is the run's files/ folder
            offline = getattr(run.settings, "mode", "") in ("offline", "dryrun")
            where["W&B run"] = (
                f"{run_dir}  (offline: upload with `wandb sync {run_dir}`)" if offline else run.url
            )
        elif isinstance(logger, CSVLogger):
            metrics = Path(logger.log_dir) / "metrics.csv"
            if metrics.is_file():
                where["CSV metrics"] = str(metrics)
        elif logger.log_dir and Path(logger.log_dir).exists():
            where[type(logger).__name__] = str(logger.log_dir)
    return where


def log_picture(loggers: Sequence[Logger], key: str, path: Path) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [str(path)])


def close_loggers(loggers: Sequence[Logger], status: str) -> None:
    """Flush and close every logger (W&B's run too), whether the run succeeded or not."""
    for logger in loggers:
        logger.finalize(status)
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)
