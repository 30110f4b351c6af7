"""Experiment loggers: W&B that never hangs on a machine without network or login, and the
few things the training run asks of its loggers (where they write, a picture, closing)."""

from __future__ import annotations

import csv
import logging
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from transfer_learning.lightning_internals import KeptMetricsWriter, csv_experiment, wandb_init_kwargs
from transfer_learning.readers import read_csv_records

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


class TemplateWandbLogger(WandbLogger):
    """Lightning's WandbLogger plus this template's switch for the best-checkpoint artifact."""

    def __init__(self, *, checkpoint_artifact: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint_artifact = checkpoint_artifact
        # Lightning passes anonymous=None on, and W&B warns on every run that it has no effect.
        wandb_init_kwargs(self).pop("anonymous", None)


def wandb_logger(**kwargs: Any) -> TemplateWandbLogger:
    """A WandbLogger that runs offline (never prompting for a login) unless W&B is set up.

    In a multirun every job joins one group named after the sweep folder, and is named after
    its job number and overrides, so W&B shows the jobs of a sweep side by side."""
    mode = wandb_mode()
    if mode != "online" and "WANDB_MODE" not in os.environ:
        log.info("No W&B login found: logging offline. Upload later with `wandb sync <run dir>`.")
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(kwargs.get("save_dir", ".")).mkdir(parents=True, exist_ok=True)
    identity = _sweep_identity(kwargs.get("name"))
    if identity:  # a multirun job: its own name, and the sweep's group unless one is set
        kwargs["name"] = identity["name"]
        kwargs["group"] = kwargs.get("group") or identity["group"]
    kwargs["tags"] = list(kwargs.get("tags") or [])
    return TemplateWandbLogger(offline=mode in ("offline", "dryrun"), mode=mode, **kwargs)


def _sweep_identity(name: str | None) -> dict[str, str]:
    """W&B group and run name of a multirun job; nothing for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra = HydraConfig.get()
    sweep = Path(str(hydra.sweep.dir))
    job = f"{name or hydra.job.name}-{hydra.job.num}"
    overrides = hydra.job.override_dirname
    return {"group": f"{sweep.parent.parent.name}-{sweep.name}", "name": f"{job} {overrides}".strip()}


def add_tags(loggers: Sequence[Logger], tags: Sequence[str]) -> None:
    """Tags the run itself knows (strategy, model), added to the configured ones."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.experiment is not None:
            run = logger.experiment
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), *tags]))


def log_table(loggers: Sequence[Logger], key: str, rows: Sequence[dict[str, Any]], images: str = "") -> None:
    """Rows as a W&B table; the column named ``images`` holds image file paths shown as pictures."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger) or not rows:
            continue
        import wandb

        columns = list(rows[0])
        data = [[_image(row[c]) if c == images else row[c] for c in columns] for row in rows]
        logger.experiment.log({key: wandb.Table(columns=list[str | int](columns), data=data)})


def _image(path: str, size: int = 160) -> Any:
    """A thumbnail of an image file for a W&B table; None (an empty cell) if it cannot be read
    any more: the run's results must not be lost to a file that changed after training."""
    import wandb

    from transfer_learning.data.images import load_rgb
    from transfer_learning.errors import DataError

    try:
        thumbnail = load_rgb(path)  # regular files only, never more than their size
    except DataError as exc:
        log.warning("W&B table: cannot show %s (%s)", path, exc)
        return None
    thumbnail.thumbnail((size, size))
    return wandb.Image(thumbnail, caption=Path(path).name)


def log_confusion_matrix(
    loggers: Sequence[Logger], key: str, matrix: Any, class_names: Sequence[str]
) -> None:
    """W&B's interactive confusion matrix, from the counts (true classes down)."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        y_true: list[int] = []
        preds: list[int] = []
        for i, row in enumerate(matrix.tolist()):
            for j, count in enumerate(row):
                y_true += [i] * int(count)
                preds += [j] * int(count)
        plot = wandb.plot.confusion_matrix(
            y_true=y_true, preds=preds, class_names=list(class_names), title="Test confusion matrix"
        )
        logger.experiment.log({key: plot})


def log_pr_curves(
    loggers: Sequence[Logger], key: str, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]
) -> None:
    """Multi-label: W&B's line plot of each class's precision-recall curve (recall across),
    where single-label runs log the confusion matrix. A class without positives has no curve."""
    drawn = {name: curve for name, curve in curves.items() if curve[0]}
    for logger in loggers:
        if not isinstance(logger, WandbLogger) or not drawn:
            continue
        import wandb

        plot = wandb.plot.line_series(
            xs=[list(recall) for _, recall in drawn.values()],
            ys=[list(precision) for precision, _ in drawn.values()],
            keys=list(drawn),
            title="Test precision-recall curves",
            xname="recall",
        )
        logger.experiment.log({key: plot})


def log_checkpoint(loggers: Sequence[Logger], path: str, metadata: dict[str, Any]) -> None:
    """The best checkpoint as a W&B model artifact, where the logger's ``checkpoint_artifact`` is on."""
    for logger in loggers:
        if isinstance(logger, TemplateWandbLogger) and logger.checkpoint_artifact and path:
            import wandb

            run = logger.experiment
            artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
            artifact.add_file(path, name=Path(path).name)
            run.log_artifact(artifact, aliases=["best"])


def log_facts(loggers: Sequence[Logger], facts: dict[str, Any]) -> None:
    """Run facts (parameter counts, batch sizes) as hyperparameters, and in the W&B summary."""
    for logger in loggers:
        logger.log_hyperparams({"run": facts})
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(facts)


class _AppendingWriter(KeptMetricsWriter):
    """Lightning's CSV writer, except that an existing metrics.csv (a resumed run in its own
    folder) is continued instead of deleted."""

    def continue_file(self, path: str) -> None:
        self.metrics_keys = read_csv_records(path, limit=None)[0]


class CSVLogger(LightningCSVLogger):
    """CSV metrics in <run>/csv/metrics.csv; a resumed run appends to its history."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        return csv_experiment(self, _AppendingWriter)

    def drop_rows_after(self, step: int) -> None:
        """Forget what was logged from ``step`` on and the earlier test: ``step`` is the global
        step of the checkpoint a run resumes from, saved after the batch logged as ``step - 1``
        (and its epoch's end and validation); the resumed run logs ``step`` and later again."""
        path = Path(self.log_dir) / "metrics.csv"
        if not path.is_file():
            return
        fields, rows = read_csv_records(path, limit=None)
        kept = [
            row
            for row in rows
            if (not row.get("step") or int(float(row["step"])) < step)
            and not any(row.get(k) for k in fields if k.startswith("test/"))  # the old run's test
        ]
        tmp = path.with_name(f".{path.name}.tmp")  # a run killed now keeps its history whole
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        tmp.replace(path)


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
        elif isinstance(logger, LightningCSVLogger):
            metrics = Path(logger.log_dir) / "metrics.csv"
            if metrics.is_file():
                where["CSV metrics"] = str(metrics)
        elif logger.log_dir and Path(logger.log_dir).exists():
            where[type(logger).__name__] = str(logger.log_dir)
    return where


def log_results(loggers: Sequence[Logger], values: dict[str, float]) -> None:
    """Numbers measured once at the end of a run, in the W&B run's summary and history."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(values)
            logger.log_metrics(values)


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
