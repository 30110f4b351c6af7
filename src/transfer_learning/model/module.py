"""The LightningModule: forward, the training, validation and test steps, and checkpoints.

What depends on the task (loss, outputs, metrics) is :mod:`transfer_learning.model.tasks`;
the optimizer and schedule, :mod:`transfer_learning.model.optimization`. What the strategy
needs it declares through hooks (:class:`~transfer_learning.model.strategies.Strategy`); the
data reach the module only as the build path hands them over (:meth:`use_loss_weights`,
:meth:`use_features_before_fit`), never by the module reading the data module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MaxMetric, MeanMetric

from transfer_learning.errors import ConfigError, TransferLearningError
from transfer_learning.features import CachedFeatures, infer_features, is_convolutional, use_bf16
from transfer_learning.lightning_internals import ddp_kwargs
from transfer_learning.model import head_only, loading
from transfer_learning.model.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE
from transfer_learning.model.network import Network
from transfer_learning.model.optimization import StrategyOptimization
from transfer_learning.model.strategies import Split, Strategy
from transfer_learning.model.tasks import ClassificationLoss, TaskMetrics, check_task, task_metrics
from transfer_learning.preprocessing import Preprocessing, resolve_input_size

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor] | None  # None: every file of the batch skipped (on_bad_file=skip)


class NonFiniteLossError(TransferLearningError, FloatingPointError):
    """The training loss became NaN or infinite."""


def _temperature(value: Any) -> bool:
    """A temperature the fit could have given (a crafted checkpoint's 1e-300 would make NaNs)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and MIN_TEMPERATURE <= value <= MAX_TEMPERATURE
    )


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


class TransferLearningModule(StrategyOptimization):
    """A pretrained backbone adapted to ``class_names`` by a transfer-learning strategy, for one
    ``task``: ``multiclass`` (one label per image) or ``multilabel`` (any number).

    It is built from plain config values only (saved as hyperparameters), so a checkpoint
    alone rebuilds it: :meth:`load_for_inference` restores the trained network, its class
    names, its preprocessing and (multi-label) its decision thresholds without the pretrained
    weights files. The module owns the input size: ``image_size`` (``input.image_size``) is
    resolved against the weights here, and the data module is handed the result.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        strategy: Mapping[str, Any],
        class_names: Sequence[str],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        image_size: int | None = None,
        image_size_strict: bool = True,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
        task: str = "multiclass",
        *,
        trusted: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "model": _plain(model),
                "strategy": _plain(strategy),
                "class_names": list(class_names),
                "optimizer": _plain(optimizer),
                "scheduler": _plain(scheduler),
                "image_size": image_size,
                "image_size_strict": image_size_strict,
                "label_smoothing": label_smoothing,
                "channels_last": channels_last,
                "task": check_task(task),
            }
        )
        self.class_names = list(class_names)
        self.task = task
        self._trusted = trusted
        self.net: Network = self._build("model", num_classes=len(class_names))
        self.strategy: Strategy = self._build("strategy")
        self.strategy.prepare(self.net)
        self.preprocessing: Preprocessing = resolve_input_size(
            self.net.preprocessing, image_size, strict=image_size_strict
        )
        self.metrics: TaskMetrics = task_metrics(task, class_names)
        self.criterion = ClassificationLoss(self.metrics.multilabel, label_smoothing)  # validation, test
        self.train_criterion = self.criterion  # weighted after use_loss_weights()
        # channels_last: the memory layout fast convolution kernels want (CPU and GPU).
        self._channels_last = channels_last and is_convolutional(self.net.backbone)
        if self._channels_last:
            self.net.backbone.to(memory_format=torch.channels_last)
        # Sample-weighted mean losses, exact across processes with unequal shards.
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_best = MaxMetric()
        self._resumed_best: float | None = None
        self.test_results: dict[str, Any] = {}
        self.test_confusion_matrix: torch.Tensor | None = None  # single-label, after testing
        self._features_before_fit: Callable[[], Mapping[str, CachedFeatures]] | None = None
        self.probe_result: dict[str, float] | None = None  # what the strategy's before_fit returned
        self.stop_on_nonfinite_loss = True  # off while the learning-rate finder sweeps
        self.calibration: dict[str, Any] | None = None  # set by calibrate(), kept in checkpoints
        self._backbone_fingerprint: str | None = None  # head_only.backbone_fingerprint's copy

    # -- what the build path hands over -----------------------------------------------------

    def use_loss_weights(self, weights: torch.Tensor | None) -> None:
        """The training loss's class weights (multiclass) or ``pos_weight`` (multilabel), from
        ``data.balance=weighted_loss``; None: unweighted. Validation and test stay unweighted."""
        if weights is None or not self.strategy.uses_loss_weights:
            self.train_criterion = self.criterion
            return
        self.train_criterion = ClassificationLoss(
            self.metrics.multilabel, self.hparams["label_smoothing"], weights.detach().float().to(self.device)
        )

    def use_features_before_fit(self, features: Callable[[], Mapping[str, CachedFeatures]]) -> None:
        """Where the features of :meth:`Strategy.features_before_fit` come from: called when fit
        starts (the device is known then), on every process."""
        self._features_before_fit = features

    # -- what the task decides ----------------------------------------------------------------

    @property
    def monitor(self) -> str:
        """The validation metric that picks the best checkpoint: ``val/acc`` or ``val/map``."""
        return self.metrics.monitor

    @property
    def thresholds(self) -> torch.Tensor | None:
        """Multi-label: each class's decision threshold, chosen on validation; else None."""
        return self.metrics.thresholds

    @thresholds.setter
    def thresholds(self, value: torch.Tensor | None) -> None:
        if not self.metrics.multilabel:
            raise ValueError("thresholds belong to multi-label models")
        self.metrics.thresholds = value

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes (multiclass) or one sigmoid per class (multilabel) of the
        logits divided by the calibration temperature (1.0 until the run is calibrated)."""
        return self.metrics.probabilities(logits)

    @property
    def temperature(self) -> float:
        """The calibration temperature (:mod:`transfer_learning.model.calibration`)."""
        return self.metrics.temperature

    def calibrate(self, temperature: float, record: Mapping[str, Any]) -> None:
        """Use ``temperature`` from now on and keep ``record`` (what it was fitted on, the
        numbers before and after) for the checkpoint."""
        self.metrics.set_temperature(temperature)
        self.calibration = {**record, "temperature": float(temperature)}

    def decide(self, probs: torch.Tensor) -> list[list[int]]:
        """The predicted class indices of each row: the top class, or every class at or above
        its threshold (multilabel; possibly none)."""
        return self.metrics.decide(probs)

    # -- forward and steps ------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of images, or of cached backbone features (a 2-D batch: head only)."""
        if x.ndim == 2:
            return self.net.head(x)
        if self.net.backbone_frozen:
            return self.net.head(self._frozen_features(x))
        return self.net(self._memory_format(x))

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last else x

    def _frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen backbone as pure inference, as the feature cache runs it."""
        bf16 = use_bf16(self.strategy.bf16, x.device)
        features = infer_features(self.net.forward_features, x, bf16, self._channels_last)
        return features.clone()  # a normal tensor again: the head's backward may save it

    def training_step(self, batch: Batch, batch_idx: int) -> Any:
        if batch is None:
            return None
        x, y = batch
        aux: list[torch.Tensor] = []
        if x.ndim == 2 or self.net.backbone_frozen:
            logits = self(x)
        else:
            logits, aux = self.net.forward_with_aux(self._memory_format(x))
        loss = self.train_criterion(logits, y)
        for aux_logits in aux:
            loss = loss + self.net.aux_loss_weight * self.train_criterion(aux_logits, y)
        self._check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        for name, metric in self.metrics.train_metrics(logits, y).items():
            self.log(name, metric, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _attached_trainer(self) -> L.Trainer | None:
        """The trainer, or None when the module is attached to none (a step called by hand)."""
        try:
            return self.trainer
        except RuntimeError:  # LightningModule.trainer: "... is not attached to a `Trainer`."
            return None

    def _check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Stop at the first non-finite training loss (on any process): the weights are about to
        become NaN, and every later epoch would only train on garbage."""
        if not self.stop_on_nonfinite_loss:
            return
        trainer = self._attached_trainer()
        bad = not bool(torch.isfinite(loss.detach()))
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        groups = trainer.optimizers[0].param_groups if trainer is not None and trainer.optimizers else []
        rates = ", ".join(f"{g['name']} {g['lr']:.3g}" for g in groups) or "unknown"
        raise NonFiniteLossError(
            f"the training loss became {float(loss.detach()):.4g} at epoch {self.current_epoch}, "
            f"batch {batch_idx} (global step {self.global_step}); learning rates: {rates}. Training "
            "stopped: the weights would be NaN from here on. Likely causes: a learning rate far too "
            "high (lower strategy.head_lr / "
            "strategy.backbone_lr, or try tune_lr=true), or broken inputs (images or cached features "
            "with NaN/inf values). Checkpoints of the last finished epoch are kept."
        )

    def _evaluate(self, batch: Batch, stage: str, loss: MeanMetric) -> None:
        if batch is None:
            return
        x, y = batch
        # Validation and test measure the float32 model that is saved, evaluated, exported and
        # predicted with: mixed precision (trainer.precision) speeds up training only. A frozen
        # backbone keeps its own precision (strategy.bf16), as the feature cache computes it.
        with torch.autocast(x.device.type, enabled=False):
            logits = self(x)
        loss.update(self.criterion(logits, y), weight=len(y))
        self.metrics.update(stage, logits, y)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_loss)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_loss)

    def on_validation_epoch_end(self) -> None:
        # Reduced over processes; every sample counts once (see the data module's samplers).
        values, _ = self.metrics.finish("val")
        values["val/loss"] = self.val_loss.compute()
        self.val_loss.reset()
        self.val_best(values[self.monitor])
        values[f"{self.monitor}_best"] = self.val_best.compute()
        shown = ("val/loss", self.monitor, f"{self.monitor}_best")
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True, sync_dist=True)
        self.log_dict({k: v for k, v in values.items() if k not in shown}, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        values, self.test_results = self.metrics.finish("test")
        values["test/loss"] = self.test_loss.compute()
        self.test_loss.reset()
        self.log_dict(values, sync_dist=True)
        self.test_confusion_matrix = self.test_results.get("confusion_matrix")

    # -- fit hooks ----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        trainer_strategy = self.trainer.strategy  # Lightning's (DDP...), not the transfer strategy
        if stage == "fit" and self.strategy.changes_what_trains and isinstance(trainer_strategy, DDPStrategy):
            # Frozen stages get no gradients in some epochs: DDP must not wait for them.
            kwargs = ddp_kwargs(trainer_strategy)
            if not kwargs.get("find_unused_parameters"):
                log.info(
                    "DDP: find_unused_parameters=True (strategy=%s freezes by epoch)", self.strategy.name
                )
                kwargs["find_unused_parameters"] = True

    def on_fit_start(self) -> None:
        if self.calibration is not None:  # trained further: the old temperature no longer fits
            self.metrics.set_temperature(1.0)
            self.calibration = None
        problem = self.strategy.check_epochs(int(self.trainer.max_epochs or -1))
        if problem and self.trainer.is_global_zero:
            log.warning(problem)
        if self.trainer.ckpt_path is None:  # a resumed run has had its step before fit
            self._before_fit()
        if self.net.backbone_frozen and not self.net.pretrained and self.trainer.is_global_zero:
            log.warning(
                "\n%s\n  The frozen backbone is RANDOM (model.weights=null): only the head trains, on\n"
                "  random features, so expect accuracy near chance. Use pretrained weights, or\n"
                "  strategy=finetune to train the whole network.\n%s",
                "!" * 78, "!" * 78,
            )  # fmt: skip

    def _before_fit(self) -> None:
        """The strategy's step before fit (LP-FT's probe), on the features it asked for. Every
        process runs it on the same features; rank zero's head is kept."""
        features: dict[str, Split] = {}
        if self.strategy.features_before_fit() is not None:
            if self._features_before_fit is None:
                raise ConfigError(
                    f"strategy={self.strategy.name} needs features before fit, and this module was given "
                    "none: build it with transfer_learning.run.config.build (which hands them over)."
                )
            device = self.net.head.weight.device
            features = {
                split: (f.features[0].to(device), f.labels.to(device))
                for split, f in self._features_before_fit().items()
            }
        result = self.strategy.before_fit(self.net, features, self.metrics.multilabel)
        if result is None:
            return
        state = {k: v.detach().clone() for k, v in self.net.head.state_dict().items()}
        self.net.head.load_state_dict(self.trainer.strategy.broadcast(state))
        self.probe_result = result
        if self.trainer.is_global_zero:
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
            log.info("strategy=%s, before fit: %s", self.strategy.name, numbers)

    def on_validation_model_train(self) -> None:
        # Lightning would restore each submodule's flag as it found it; train() re-applies
        # the network's policy (a frozen backbone and frozen BatchNorm layers stay in eval mode).
        self.trainer.model.train()  # type: ignore[union-attr]

    def on_train_start(self) -> None:
        self.val_best.reset()  # drop values from the sanity-check run
        if self._resumed_best is not None:  # a resumed run keeps its best-so-far
            self.val_best.update(torch.tensor(self._resumed_best))

    def on_train_epoch_start(self) -> None:
        self.strategy.on_epoch_start(self.net, self.current_epoch)  # what trains this epoch
        self._scale_lrs(float(self.current_epoch))

    # -- checkpoints -----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["preprocessing"] = self.preprocessing.to_dict()
        if self.val_best.update_called:
            checkpoint["val_best"] = float(self.val_best.compute())
        if self.thresholds is not None:
            checkpoint["thresholds"] = [float(t) for t in self.thresholds]
        checkpoint["arch_kwargs"] = self.net.arch_kwargs
        if self.calibration is not None:
            checkpoint["calibration"] = dict(self.calibration)
        self.save_base_lrs(checkpoint)
        if head_only.leaves_out_backbone(self) and head_only.fitting(self._attached_trainer()):
            head_only.leave_out_backbone(checkpoint, self, head_only.backbone_fingerprint(self))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        loading.check_compatible(checkpoint.get("hyper_parameters") or {}, dict(self.hparams))
        head_only.put_back_backbone(checkpoint, self, "the checkpoint")
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = loading.model_state(checkpoint["state_dict"])
        # "val_acc_best": checkpoints written before multi-label (the best val/acc).
        self._resumed_best = checkpoint.get("val_best", checkpoint.get("val_acc_best"))
        self.load_base_lrs(checkpoint)
        if "preprocessing" in checkpoint:
            self.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])
        if self.metrics.multilabel and checkpoint.get("thresholds") is not None:
            self.thresholds = torch.tensor(checkpoint["thresholds"], dtype=torch.float32)
        calibration = checkpoint.get("calibration")
        if isinstance(calibration, dict) and _temperature(calibration.get("temperature")):
            # The thresholds above were saved in the calibrated space: set, not moved.
            self.metrics.temperature = float(calibration["temperature"])
            self.calibration = dict(calibration)

    @classmethod
    def load_for_inference(cls, path: str | Path, map_location: str = "cpu") -> TransferLearningModule:
        """Rebuild from a checkpoint alone (:func:`transfer_learning.model.loading.load_for_inference`)."""
        return loading.load_for_inference(cls, path, map_location)
