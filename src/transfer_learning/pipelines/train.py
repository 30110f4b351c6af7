"""compose -> build -> fit -> calibrate -> test the best checkpoint -> report. Nothing else."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from transfer_learning.errors import ConfigError
from transfer_learning.hardware import OTHER_PRECISIONS, PRECISIONS, PrecisionChoice, choose_precision
from transfer_learning.model.head_only import complete_checkpoints
from transfer_learning.pipelines.cross_validation import cross_validate, oof_logits
from transfer_learning.results.analysis import (
    run_facts,
)
from transfer_learning.results.calibration_report import calibrate_best
from transfer_learning.results.confidence import BOUNDS
from transfer_learning.results.evaluate import RUN_CONFIG
from transfer_learning.results.finish import finish_run
from transfer_learning.results.reporting import (
    best_checkpoint,
    number,
)
from transfer_learning.run.checkpoints import SafeCheckpointIO, check_resumable, safe_load
from transfer_learning.run.config import build, check_writable, expand_path, expand_paths
from transfer_learning.run.loggers import (
    CSVLogger,
    add_tags,
    close_loggers,
    log_facts,
)
from transfer_learning.run.lr_finder import check_tune_lr, tune_learning_rate
from transfer_learning.run.preemption import SaveOnPreemption
from transfer_learning.run.random_state import RandomState, check_saved_state
from transfer_learning.run.resume import run_folder_of, save_run_settings

log = logging.getLogger(__name__)


def _instantiate_all(group: DictConfig | None, name: str, kind: type) -> list[Any]:
    """Every entry of a config group that has a ``_target_``; ``key: null`` switches one off.
    An entry that builds something other than a ``kind`` is refused, naming it."""
    if not group:
        return []
    built = []
    for key, spec in group.items():
        if isinstance(spec, DictConfig) and "_target_" in spec:
            thing = instantiate(spec)
            if not isinstance(thing, kind):
                raise ConfigError(
                    f"{name}.{key!s} (_target_: {spec._target_}) built a {type(thing).__name__}, not a "
                    f"Lightning {kind.__name__}. Point its _target_ at a {kind.__name__} class, or drop "
                    f"it (~{name}.{key!s})."
                )
            built.append(thing)
    return built


AUTO = "auto"


def resolve_monitor(cfg: DictConfig, monitor: str) -> None:
    """``monitor: auto`` of every callback in ``cfg.callbacks`` (the best checkpoint, early
    stopping) becomes ``monitor``, the task's validation metric (``module.monitor``: val/acc for
    multiclass, val/map for multilabel), and ``optimized_metric: auto`` becomes ``<monitor>_best``,
    in place, before the callbacks are built; an explicitly named metric stays as it is."""
    with open_dict(cfg):
        for callback in (cfg.get("callbacks") or {}).values():
            if isinstance(callback, DictConfig) and callback.get("monitor") == AUTO:
                callback.monitor = monitor
        if cfg.get("optimized_metric") == AUTO:
            cfg.optimized_metric = f"{monitor}_best"


def check_trainer(cfg: DictConfig) -> None:
    """Trainer settings that cannot work, stopped before anything is built."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}, but torch finds no GPU on this machine (CUDA "
            f"available: False, torch {torch.__version__}). Use trainer=cpu (or trainer=ddp_cpu), or "
            "run where a GPU and its driver are visible."
        )
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and int(epochs) == 0:
        raise ConfigError(
            "trainer.max_epochs=0 trains nothing: the test would measure an untrained head. Set 1 or "
            "more (or -1 with trainer.max_steps)."
        )


def check_precision(cfg: DictConfig) -> None:
    """An unknown ``trainer.precision``, stopped before anything is built."""
    requested = str(cfg.trainer.get("precision", AUTO))
    if requested not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={requested} is not a precision. Use auto (the default: the fastest this "
            "hardware runs natively), 32, 16-mixed or bf16-mixed (also: "
            f"{', '.join(OTHER_PRECISIONS)})."
        )


def resolve_precision(cfg: DictConfig, module: Any = None) -> PrecisionChoice:
    """``trainer.precision`` made concrete for this machine, in place (``auto``: the fastest
    precision its processors run natively, for what ``module`` trains); an explicit bf16 that
    this hardware emulates is kept, with one warning that gives its measured cost."""
    check_precision(cfg)
    requested = str(cfg.trainer.get("precision", AUTO))
    crop = module.preprocessing.crop_size if module is not None else None
    trains = not module.net.backbone_frozen if module is not None else True
    choice = choose_precision(requested, str(cfg.trainer.get("accelerator", AUTO)), crop, trains)
    with open_dict(cfg):
        cfg.trainer.precision = choice.precision
    if choice.warning and getattr(rank_zero_only, "rank", 0) == 0:
        log.warning(choice.warning)
    return choice


def write_run_config(cfg: DictConfig, path: Path) -> None:
    """The run's data settings, resolved, with absolute paths (``eval.py`` reads them)."""
    data = expand_paths(OmegaConf.to_container(cfg.data, resolve=True))
    for key in ("root", "scan_cache_dir"):
        if data.get(key):
            data[key] = str(Path(data[key]).absolute())
    if isinstance(data.get("generate"), dict) and data["generate"].get("root"):
        data["generate"]["root"] = str(Path(data["generate"]["root"]).absolute())
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"data": data}), path)


def _resumable(ckpt_path: str, cfg: DictConfig, module: Any) -> dict[str, Any]:
    """The checkpoint to resume from, read (pickle-free) and checked against this run before
    anything is trained or written: :func:`check_resumable`."""
    saved = safe_load(ckpt_path)
    check_saved_state(saved)
    max_epochs = cfg.trainer.get("max_epochs")
    # a fold of cv=K resumes in its own folder (<run>/folds/fold<k>), not in the cv run's
    folder = Path(cfg.paths.output_dir) if cfg.data.get("cv_folds") else run_folder_of(Path(ckpt_path))
    done = check_resumable(
        saved, dict(module.hparams), len(module.strategy.param_groups(module.net)),
        None if max_epochs is None else int(max_epochs), ckpt_path, folder,
    )  # fmt: skip
    total = f" of {max_epochs}" if max_epochs is not None and int(max_epochs) >= 0 else ""
    if getattr(rank_zero_only, "rank", 0) == 0:  # every DDP process checks; the first one says it
        log.info(
            "Continuing %s from %s: %d%s epochs done",
            folder or "a new run folder",
            Path(ckpt_path).name,
            done,
            total,
        )
    return saved


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test as ``cfg`` says; return the metrics (sweepers optimise one of them).

    SIGTERM at any point (preemption, a time limit) saves what can be saved and ends the run
    with :class:`Preempted`, which says how to go on (exit code 143)."""
    if cfg.get("cv") is not None and cfg.cv.get("folds"):  # cv=K: K of these runs, in one folder
        return cross_validate(cfg, train)
    preemption = SaveOnPreemption(resumed_from=expand_path(cfg.ckpt_path) if cfg.get("ckpt_path") else None)
    with preemption.handling_sigterm():
        try:
            return _train(cfg, preemption)
        except SIGTERMException:
            raise preemption.preempted() from None
        except Exception as exc:
            if not preemption.received:
                raise
            raise preemption.preempted(cause=exc) from exc  # e.g. loader workers ended by the signal


def _train(cfg: DictConfig, preemption: SaveOnPreemption) -> dict[str, Any]:
    check_trainer(cfg)
    check_tune_lr(cfg)
    check_precision(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    precision = resolve_precision(cfg, module)
    resolve_monitor(cfg, module.monitor)
    oof = None  # cv.refit=true: calibrated on the folds' out-of-fold logits (read before training)
    if datamodule.refit and datamodule.cv_folds and cfg.get("calibrate", True):
        oof = oof_logits(Path(cfg.paths.output_dir).parent.parent, datamodule.cv_folds)
    ckpt_path = expand_path(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    saved = _resumable(ckpt_path, cfg, module) if ckpt_path else None  # before any logger makes files
    callbacks: list[Callback] = [
        *_instantiate_all(cfg.get("callbacks"), "callbacks", Callback),
        preemption,
        RandomState(),
    ]
    loggers: list[Logger] = _instantiate_all(cfg.get("logger"), "logger", Logger)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[SafeCheckpointIO()]
    )
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir, "hydra.run.dir")
    checkpoint_callback = best_checkpoint(trainer)
    if checkpoint_callback is not None and checkpoint_callback.dirpath:
        check_writable(Path(checkpoint_callback.dirpath), "callbacks.model_checkpoint.dirpath")
    if (
        saved is not None and trainer.is_global_zero
    ):  # in the run's own folder: one history, from the checkpoint on
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                logger.drop_rows_after(int(saved.get("global_step", 0)))
    if trainer.is_global_zero:  # what eval.py reads to rebuild this run's splits; what a resume restores
        write_run_config(cfg, output_dir / RUN_CONFIG)
        if HydraConfig.initialized() and not cfg.data.get("cv_folds"):  # (a fold's are its cv run's)
            save_run_settings(output_dir, HydraConfig.get().overrides.task)
    model_name = cfg.model.get("name") or cfg.model._target_.rsplit(".", 1)[-1]
    facts = {**run_facts(module, datamodule, trainer), "precision": precision.precision,
             "precision/why": precision.reason}  # fmt: skip
    status = "failed"
    tuned: dict[str, str] = {}  # the LR finder's summary entries (tune_lr=true)
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        if trainer.is_global_zero:
            log_facts(loggers, facts)
            add_tags(loggers, [module.strategy.name, model_name])
        with warnings.catch_warnings():
            # A frozen backbone in eval mode is this template's intent, not the accident Lightning warns of.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            if cfg.get("tune_lr"):  # sets the strategy's rates before fit builds the optimizer
                steps = int(cfg.get("tune_lr_steps", 100))
                tuned = tune_learning_rate(trainer, module, datamodule, output_dir, loggers, steps)
            preemption.training = True  # from here on, SIGTERM saves a checkpoint to resume from
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        preemption.check()  # a SIGTERM after Lightning's last look stops the run here
        fit_metrics = {k: number(v) for k, v in trainer.callback_metrics.items()}

        checkpoint = best_checkpoint(trainer)
        best_path = checkpoint.best_model_path if checkpoint else ""
        if cfg.get("calibrate", True):  # the temperature goes into the checkpoint the test loads
            calibrate_best(trainer, module, datamodule, best_path, oof)  # (writes it whole)
            preemption.check()
        # A frozen backbone went into none of the checkpoints while fitting: written in now, after
        # calibration has rewritten the best one (a backbone of 0.5 GB is written once, not twice).
        complete_checkpoints(trainer, module)
        trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        preemption.check()
        test_metrics = {k: number(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        summary = finish_run(
            cfg, trainer, module, datamodule, loggers, best_path, fit_metrics, test_metrics, facts, tuned
        )
        status = "success"
        bounds = {k: v for k, v in summary.items() if k.endswith(BOUNDS)}  # the sweep table shows them
        return {**fit_metrics, **test_metrics, **bounds, "best_checkpoint": best_path, "summary": summary}
    finally:
        close_loggers(loggers, status)
