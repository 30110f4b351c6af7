"""Experiment loggers that never hang on a machine without network or W&B login."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

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
