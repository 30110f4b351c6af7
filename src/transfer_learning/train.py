"""compose -> build -> fit -> test the best checkpoint -> report. Nothing else."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from transfer_learning.config import build, expand_path
from transfer_learning.loggers import close_loggers, log_picture, logger_locations
from transfer_learning.reporting import (
    best_checkpoint,
    build_summary,
    format_summary,
    number,
    save_confusion_matrix,
    save_confusion_table,
    write_summary,
)


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Every entry of a config group that has a ``_target_``; ``key: null`` switches one off."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test as ``cfg`` says; return the metrics (sweepers optimise one of them)."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    callbacks: list[Callback] = _instantiate_all(cfg.get("callbacks"))
    loggers: list[Logger] = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = expand_path(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    status = "failed"
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        with warnings.catch_warnings():
            # A frozen backbone in eval mode is this template's intent, not the accident Lightning warns of.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_metrics = {k: number(v) for k, v in trainer.callback_metrics.items()}

        checkpoint = best_checkpoint(trainer)
        best_path = checkpoint.best_model_path if checkpoint else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None)
        test_metrics = {k: number(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}

        model_name = cfg.model.get("name") or cfg.model._target_.rsplit(".", 1)[-1]
        summary = build_summary(
            trainer, module, datamodule, model_name, fit_metrics, test_metrics, output_dir
        )
        if trainer.is_global_zero:
            matrix, names = module.test_confusion_matrix, module.class_names
            assert matrix is not None
            picture = save_confusion_matrix(matrix, names, output_dir / "confusion_matrix.png")
            save_confusion_table(matrix, names, output_dir / "confusion_matrix.csv")
            log_picture(loggers, "test/confusion_matrix", picture)
            summary["confusion matrix"] = str(picture)
            summary.update(logger_locations(loggers))
            write_summary(summary, output_dir / "summary.json")
            print(format_summary(summary), flush=True)
        status = "success"
        return {**fit_metrics, **test_metrics, "best_checkpoint": best_path, "summary": summary}
    finally:
        close_loggers(loggers, status)
