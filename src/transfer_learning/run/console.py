"""A quiet console: one line per event, in words; ``train.log`` keeps every detail.

Hydra gives the root logger two handlers, the console and the run's log file. Lightning adds
its own console handler to its loggers when it is imported, so each of its lines came twice;
it also prints tips and notes that concern its own machinery rather than the user's run. Here,
once Hydra has set logging up: Lightning's extra handlers are removed (its records still reach
both of Hydra's), the console shows messages without timestamps and module names (warnings and
errors say so), and the notes below go to the log file only.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

# Records that describe Lightning's machinery, not the user's run: the log file keeps them.
FILE_ONLY = re.compile(
    r"|".join(
        [
            r"Tip: For seamless cloud logging",  # an advertisement for another package
            r"already configured with model summary callbacks",
            r"^(GPU|TPU|HPU) available:",
            r"Loading `\w+_dataloader` to estimate number of stepping batches",
            r"`weights_only` was not set",
            r"Received SIGTERM: \d+",  # this template says what the signal did (and if it was Ctrl-C)
            r"Restoring states from the checkpoint path",
            r"Restored all states from the checkpoint",
            r"Loaded model weights from the checkpoint",
            r"Checkpoint directory .* exists and is not empty",  # a resumed run writes into its own
            r"^Using (bfloat16|16bit) Automatic Mixed Precision",  # the run summary says which and why
            r"^\s*\| Name\s+\| Type",  # the model summary table (the run summary has the counts)
        ]
    )
)
FILE_ONLY_LOGGERS = ("lightning.pytorch.callbacks.model_summary",)
# Python warnings from libraries about their own internals.
IGNORED_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r".*Checkpoint directory .* exists and is not empty",
    r".*is not supported by the model summary",  # its size estimate, which the console never shows
)


class ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.name not in FILE_ONLY_LOGGERS and not FILE_ONLY.search(record.getMessage())


class ConsoleFormatter(logging.Formatter):
    """``message`` for information, ``Warning: message`` / ``Error: message`` otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"Error: {text}"
        if record.levelno >= logging.WARNING:
            return f"Warning: {text}"
        return text


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return not isinstance(handler, logging.FileHandler) and stream in (sys.stdout, sys.stderr)


def quiet_console() -> None:
    """Set the console up as the module docstring says (idempotent; the log file is untouched)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lightning_logger = logging.getLogger(name)
        for handler in list(lightning_logger.handlers):
            if _is_console(handler):
                lightning_logger.removeHandler(handler)
        lightning_logger.propagate = True
    for handler in logging.getLogger().handlers:
        if _is_console(handler):
            handler.setFormatter(ConsoleFormatter("%(message)s"))
            if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
                handler.addFilter(ConsoleFilter())
    for message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
