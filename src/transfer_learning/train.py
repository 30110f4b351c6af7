"""compose -> instantiate -> fit -> test the best checkpoint -> summary. Nothing else."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from transfer_learning.data import ImageFolderDataModule
from transfer_learning.module import TransferLearningModule
from transfer_learning.reporting import format_summary, save_confusion_matrix, write_summary

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Every entry of a config group that has a ``_target_``; ``key: null`` switches one off."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def _shorten(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, torch.Tensor | float | int) else None


def _logger_locations(loggers: list[Logger]) -> dict[str, str]:
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
            where["CSV metrics"] = str(Path(logger.log_dir) / "metrics.csv")
        elif logger.log_dir:
            where[type(logger).__name__] = str(logger.log_dir)
    return where


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test as ``cfg`` says; return the metrics (sweepers optimise one of them)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    # A frozen body in eval mode is this template's intent, not the accident Lightning warns of.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

    datamodule: ImageFolderDataModule = instantiate(cfg.data)
    class_names = datamodule.discover()
    module = TransferLearningModule(
        model=cfg.model,
        strategy=cfg.strategy,
        class_names=class_names,
        optimizer=cfg.optimizer,
        scheduler=cfg.get("scheduler"),
        image_size=cfg.data.get("image_size"),
        label_smoothing=cfg.get("label_smoothing", 0.0),
    )
    datamodule.set_preprocessing(module.preprocessing)

    callbacks: list[Callback] = _instantiate_all(cfg.get("callbacks"))
    loggers: list[Logger] = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    output_dir = Path(cfg.paths.output_dir)
    status = "failed"
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        fit_metrics = {k: _number(v) for k, v in trainer.callback_metrics.items()}

        checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)  # type: ignore[attr-defined]
        best_path = checkpoint.best_model_path if checkpoint else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None)
        test_metrics = {k: _number(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}

        summary: dict[str, Any] = {
            "model": cfg.model.get("name", cfg.model._target_.rsplit(".", 1)[-1]),
            "strategy": module.strategy.name,
            "classes": f"{len(class_names)} ({_shorten(class_names)})",
            "images train/val/test": "/".join(str(n) for n in datamodule.split_sizes().values()),
            "epochs run": trainer.current_epoch,
            "best val/acc": _number(checkpoint.best_model_score)
            if checkpoint and checkpoint.best_model_score is not None
            else fit_metrics.get("val/acc"),
            **{k: v for k, v in test_metrics.items() if k != "test/loss"},
            "best checkpoint": best_path or "(none saved)",
            "output dir": str(output_dir),
        }
        if trainer.is_global_zero:
            assert module.test_confusion_matrix is not None
            picture = save_confusion_matrix(
                module.test_confusion_matrix, class_names, output_dir / "confusion_matrix.png"
            )
            summary["confusion matrix"] = str(picture)
            for logger in loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image("test/confusion_matrix", [str(picture)])
            summary.update(_logger_locations(loggers))
            write_summary(summary, output_dir / "summary.json")
            print(format_summary(summary), flush=True)
        status = "success"
        return {**fit_metrics, **test_metrics, "best_checkpoint": best_path, "summary": summary}
    finally:
        for logger in loggers:
            logger.finalize(status)
            if isinstance(logger, WandbLogger):
                import wandb

                wandb.finish()
