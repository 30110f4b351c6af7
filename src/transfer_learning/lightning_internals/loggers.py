"""Private state of Lightning: loggers."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from transfer_learning.lightning_internals.checked import changed, private_mapping

if TYPE_CHECKING:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger


# -- loggers --------------------------------------------------------------------------------------
# The keyword arguments WandbLogger passes to wandb.init when its experiment starts are kept in its
# private _wandb_init; its constructor always adds anonymous=None, which W&B warns about on every
# run, and no public way leaves it out. Checked with Lightning 2.6.6.
WANDB_INIT_REASON = (
    "WandbLogger keeps what it passes to wandb.init in the private _wandb_init, and always adds "
    "anonymous=None to it"
)


def wandb_init_kwargs(logger: WandbLogger) -> MutableMapping[str, Any]:
    """The (live) keyword arguments ``logger`` will call ``wandb.init`` with."""
    return private_mapping(
        logger,
        "_wandb_init",
        "WandbLogger._wandb_init",
        "leaving anonymous=None out of wandb.init",
        WANDB_INIT_REASON,
    )


# Lightning's CSVLogger.experiment makes its ExperimentWriter on first use (after making the
# folder through its file system) and keeps it: the class it makes is fixed, and the writer and
# the file system are its private _experiment and _fs. Checked with Lightning 2.6.6.
CSV_EXPERIMENT_REASON = (
    "CSVLogger.experiment always makes Lightning's own ExperimentWriter, kept in the private "
    "_experiment (the folder made through the private _fs)"
)


def csv_experiment(logger: CSVLogger, writer: Callable[[str], ExperimentWriter]) -> ExperimentWriter:
    """What ``CSVLogger.experiment`` returns, with the writer made by ``writer(log_dir)``."""
    if not hasattr(logger, "_experiment") or not hasattr(getattr(logger, "_fs", None), "makedirs"):
        raise changed(
            "CSVLogger._experiment / CSVLogger._fs",
            "continuing metrics.csv in a resumed run",
            CSV_EXPERIMENT_REASON,
        )
    if logger._experiment is None:
        logger._fs.makedirs(logger.root_dir, exist_ok=True)
        logger._experiment = writer(logger.log_dir)
    return logger._experiment  # type: ignore[return-value]


# Lightning's CSV ExperimentWriter deletes an existing metrics.csv when it is made (in its private
# _check_log_dir_exists, called from __init__; files through its private _fs); no public option
# keeps the file. This writer calls continue_file(path) instead. Checked with Lightning 2.6.6.
KEPT_METRICS_REASON = (
    "Lightning's ExperimentWriter deletes an existing metrics.csv in its private "
    "_check_log_dir_exists, called from __init__; no public option keeps it"
)


class KeptMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is kept: :meth:`continue_file`
    is called with its path instead of the file being deleted."""

    def __init__(self, log_dir: str) -> None:
        if not callable(getattr(ExperimentWriter, "_check_log_dir_exists", None)):
            raise changed(
                "ExperimentWriter._check_log_dir_exists",
                "continuing metrics.csv in a resumed run",
                KEPT_METRICS_REASON,
            )
        self.tl_checked_existing = False
        super().__init__(log_dir=log_dir)
        if not self.tl_checked_existing:  # Lightning no longer calls it: it may have deleted the file
            raise changed(
                "ExperimentWriter._check_log_dir_exists (called from __init__)",
                "continuing metrics.csv in a resumed run",
                KEPT_METRICS_REASON,
            )

    def _check_log_dir_exists(self) -> None:
        self.tl_checked_existing = True
        fs: Any = getattr(self, "_fs", None)
        if not hasattr(fs, "isfile"):
            raise changed(
                "ExperimentWriter._fs", "continuing metrics.csv in a resumed run", KEPT_METRICS_REASON
            )
        if fs.isfile(self.metrics_file_path):
            self.continue_file(self.metrics_file_path)

    def continue_file(self, path: str) -> None:
        """Take up the existing ``metrics.csv`` at ``path`` (at least its columns, ``metrics_keys``)."""
        raise NotImplementedError
