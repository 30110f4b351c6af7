"""The LightningModule: forward, losses, metrics, and the optimizer built from the strategy."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from transfer_learning.data.feature_cache import infer_features, is_convolutional, use_bf16
from transfer_learning.errors import TransferLearningError
from transfer_learning.model.network import Network
from transfer_learning.model.preprocessing import Preprocessing, resolve_input_size
from transfer_learning.model.strategies import LinearProbeFineTune, Strategy
from transfer_learning.run import registry
from transfer_learning.run.checkpoints import CheckpointError, check_compatible, safe_load

log = logging.getLogger(__name__)


class NonFiniteLossError(TransferLearningError, FloatingPointError):
    """The training loss became NaN or infinite."""


# Keys of the scheduler config that are Lightning's, not the scheduler's own arguments.
LIGHTNING_SCHEDULER_KEYS = ("interval", "frequency", "monitor")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1
) -> LambdaLR:
    """Linear warm-up, then cosine decay to zero. One multiplier for every group, so the
    ratio between the backbone's and the head's learning rate holds throughout."""
    warmup = max(1, int(total_steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def one_cycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> LambdaLR:
    """The one-cycle policy (Smith; fastai's ``fit_one_cycle``) as one multiplier on every group's
    rate: cosine from ``1/div_factor`` up to 1 over the first ``pct_start`` of the steps, then
    cosine down to ``1/(div_factor * final_div_factor)``. Unlike torch's ``OneCycleLR``, which
    sets every group to one ``max_lr``, it keeps the ratios between param groups."""
    warmup = max(1, int(total_steps * pct_start))
    low, end = 1 / div_factor, 1 / (div_factor * final_div_factor)

    def factor(step: int) -> float:
        if step < warmup:
            return low + (1 - low) * 0.5 * (1 - math.cos(math.pi * step / warmup))
        progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, macro F1 and (above five classes) top-5 accuracy, each from its own state.

    ``compute_groups=False``: torchmetrics would otherwise merge metrics whose states happen to
    be equal after the first batch (F1 and top-5 accuracy when that batch is all correct) and
    report one metric's value under the other's name for the rest of the run.
    """
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


class TransferLearningModule(L.LightningModule):
    """A pretrained backbone adapted to ``class_names`` by a transfer-learning strategy.

    It is built from plain config values only (saved as hyperparameters), so a checkpoint
    alone rebuilds it: :meth:`load_for_inference` restores the trained network, its class
    names and its preprocessing without the pretrained weights files. The module owns the
    input size: ``image_size`` (``input.image_size``) is resolved against the weights here, and
    the data module is handed the result.
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
            }
        )
        self.class_names = list(class_names)
        # Settings from the user's own config are Hydra's to build; read from a checkpoint
        # (trusted=False) they are data, built only from the template's allow-lists.
        self._trusted = trusted
        self.net: Network = self._build("model", num_classes=len(class_names))
        self.strategy: Strategy = self._build("strategy")
        self.strategy.prepare(self.net)
        self.preprocessing: Preprocessing = resolve_input_size(
            self.net.preprocessing, image_size, strict=image_size_strict
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_criterion = self.criterion  # class-weighted with data.balance=weighted_loss
        # channels_last: the memory layout fast convolution kernels want (CPU and GPU).
        self._channels_last = channels_last and is_convolutional(self.net.backbone)
        if self._channels_last:
            self.net.backbone.to(memory_format=torch.channels_last)
        n = len(class_names)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_metrics = classification_metrics(n, "val/")
        self.test_metrics = classification_metrics(n, "test/")
        # Sample-weighted mean losses, exact across processes with unequal shards.
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self._resumed_best: float | None = None
        self.test_confusion = MulticlassConfusionMatrix(n)
        self.test_confusion_matrix: torch.Tensor | None = None
        # The scheduler's learning rate of each param group, before the strategy's factor
        # (Strategy.lr_scale: gradual unfreezing's ramps); None until the first training batch.
        self._base_lrs: list[float] | None = None
        self._saved_base_lrs: list[float] | None = None
        self._lr_progress = 0.0
        self.probe_result: dict[str, float] | None = None
        self.stop_on_nonfinite_loss = True  # off while the learning-rate finder sweeps

    def _build(self, kind: str, _source: str = "the checkpoint", **extra: Any) -> Any:
        spec = self.hparams[kind]
        if self._trusted:
            return instantiate(spec, **extra)
        return registry.build(kind, spec, _source, **extra)

    # -- forward and steps -----------------------------------------------------------------

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
        features = infer_features(self.net.forward_features, x, self._bf16(x.device), self._channels_last)
        return features.clone()  # a normal tensor again: the head's backward may save it

    def _bf16(self, device: torch.device) -> bool:
        return use_bf16(getattr(self.strategy, "bf16", False), device)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> Any:
        if batch is None:  # every file of the batch skipped (data.on_bad_file=skip): no step
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
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Stop at the first non-finite training loss (on any process): the weights are about to
        become NaN, and every later epoch would only train on garbage."""
        if not self.stop_on_nonfinite_loss:
            return
        trainer = self._trainer  # None when a step is called by hand
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

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor] | None, metrics: MetricCollection, loss: MeanMetric
    ) -> torch.Tensor | None:
        if batch is None:  # every file of the batch skipped (data.on_bad_file=skip)
            return None
        x, y = batch
        logits = self(x)
        loss.update(self.criterion(logits, y), weight=len(y))
        metrics.update(logits, y)
        return logits

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if stage == "fit" and self.strategy.changes_what_trains and isinstance(strategy, DDPStrategy):
            # Frozen stages get no gradients in some epochs: DDP must not wait for them.
            kwargs = strategy._ddp_kwargs
            if not kwargs.get("find_unused_parameters"):
                log.info(
                    "DDP: find_unused_parameters=True (strategy=%s freezes by epoch)", self.strategy.name
                )
                kwargs["find_unused_parameters"] = True

    def on_fit_start(self) -> None:
        problem = self.strategy.check_epochs(int(self.trainer.max_epochs or -1))
        if problem and self.trainer.is_global_zero:
            log.warning(problem)
        if isinstance(self.strategy, LinearProbeFineTune) and self.trainer.ckpt_path is None:
            self._linear_probe()
        weights = getattr(getattr(self.trainer, "datamodule", None), "loss_weights", lambda: None)()
        if weights is not None:
            smoothing = self.hparams["label_smoothing"]
            self.train_criterion = nn.CrossEntropyLoss(
                weight=weights.to(self.device), label_smoothing=smoothing
            )
        if self.net.backbone_frozen and not self.net.pretrained and self.trainer.is_global_zero:
            log.warning(
                "\n%s\n  The frozen backbone is RANDOM (model.weights=null): only the head trains, on\n"
                "  random features, so expect accuracy near chance. Use pretrained weights, or\n"
                "  strategy=finetune to train the whole network.\n%s",
                "!" * 78, "!" * 78,
            )  # fmt: skip

    def on_validation_model_train(self) -> None:
        # Lightning would restore each submodule's flag as it found it; train() re-applies
        # the network's policy (a frozen backbone and frozen BatchNorm layers stay in eval mode).
        self.trainer.model.train()  # type: ignore[union-attr]

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # drop values from the sanity-check run
        if self._resumed_best is not None:  # a resumed run keeps its best-so-far
            self.val_acc_best.update(torch.tensor(self._resumed_best))

    def on_train_epoch_start(self) -> None:
        set_epoch = getattr(getattr(self.trainer, "datamodule", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.current_epoch)  # which cached view this epoch reads
        self.strategy.on_epoch_start(self.net, self.current_epoch)  # what trains this epoch
        self._scale_lrs(float(self.current_epoch))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._scale_lrs(self._progress(batch_idx))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimizer and scheduler steps: the next batch's rates, so that the learning
        # rate monitor (which logs before this module's batch hook) shows what the step will use.
        self._scale_lrs(self._progress(batch_idx + 1))

    def _linear_probe(self) -> None:
        """LP-FT's first phase: the head fitted on frozen features before fine-tuning starts.
        Every process fits the same head from the same cached features; rank zero's is kept."""
        datamodule = self.trainer.datamodule  # type: ignore[attr-defined]
        assert isinstance(self.strategy, LinearProbeFineTune)
        features = datamodule.probe_features()
        device = self.net.head.weight.device
        train, val = ((f.features[0].to(device), torch.as_tensor(f.labels, device=device))
                      for f in (features["train"], features["val"]))  # fmt: skip
        result = self.strategy.fit_probe(self.net.head, train, val)
        state = self.trainer.strategy.broadcast(
            {k: v.detach().clone() for k, v in self.net.head.state_dict().items()}
        )
        self.net.head.load_state_dict(state)
        self.probe_result = result
        if self.trainer.is_global_zero:
            log.info(
                "Linear probe (LP-FT): head fitted on %d cached feature vectors, L2 %.0e chosen on val "
                "(val acc %.4f, val loss %.4f, train acc %.4f); fine-tuning everything next.",
                len(train[1]), result["weight_decay"], result["val_acc"], result["val_loss"],
                result["train_acc"],
            )  # fmt: skip

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        # compute() reduces over processes; every sample counts once (see the data module).
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        values["val/loss"] = self.val_loss.compute()
        self.val_loss.reset()
        self.val_acc_best(values["val/acc"])
        values["val/acc_best"] = self.val_acc_best.compute()
        shown = ("val/loss", "val/acc", "val/acc_best")
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True, sync_dist=True)
        self.log_dict({k: v for k, v in values.items() if k not in shown}, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> None:
        logits = self._evaluate(batch, self.test_metrics, self.test_loss)
        if logits is not None and batch is not None:
            self.test_confusion.update(logits, batch[1])

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.test_metrics.reset()
        values["test/loss"] = self.test_loss.compute()
        self.test_loss.reset()
        self.log_dict(values, sync_dist=True)
        # Every process takes part in the reduction; only rank zero draws the picture later.
        self.test_confusion_matrix = self.test_confusion.compute().cpu()
        self.test_confusion.reset()

    # -- optimisation ----------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        self._base_lrs = None  # a new optimizer (the LR finder builds its own first)
        groups = self.strategy.param_groups(self.net)
        optimizer = self._build("optimizer")(groups)
        if not (self.hparams["scheduler"] or {}).get("_target_"):  # scheduler=constant
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler(optimizer)}

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Any ``torch.optim.lr_scheduler`` class (or factory) with its own arguments, plus
        Lightning's ``interval`` (step | epoch), ``frequency`` and ``monitor``. A scheduler that
        takes ``total_steps`` and is not given one gets the run's length in its interval."""
        spec = dict(self.hparams["scheduler"])
        lightning = {k: spec.pop(k) for k in LIGHTNING_SCHEDULER_KEYS if k in spec}
        lightning.setdefault("interval", "epoch")
        factory = (
            instantiate(spec, _partial_=True)
            if self._trusted
            else registry.build("scheduler", {**spec, "_partial_": True}, "the checkpoint")
        )
        kwargs = {}
        if "total_steps" in inspect.signature(factory).parameters and "total_steps" not in spec:
            by_step = lightning["interval"] == "step"
            total = self.trainer.estimated_stepping_batches if by_step else self.trainer.max_epochs
            kwargs["total_steps"] = int(total or 0)
        return {"scheduler": factory(optimizer, **kwargs), **lightning}

    # The strategy's per-group factor (Strategy.lr_scale) sits on top of the schedule: each group
    # trains at base * factor, and the scheduler only ever sees and steps the base rates, so
    # every torch scheduler (chainable or closed-form) composes with it, and checkpoints keep
    # the bases for resuming.

    def _progress(self, batch_idx: int) -> float:
        batches = self.trainer.num_training_batches
        fraction = batch_idx / batches if batches and math.isfinite(batches) else 0.0
        return self.current_epoch + fraction

    def _lr_groups(self) -> list[dict[str, Any]] | None:
        if not self.strategy.changes_what_trains or not self.trainer.optimizers:
            return None  # no factors: the optimizer's rates are the schedule's
        groups = self.trainer.optimizers[0].param_groups
        if self._base_lrs is None:
            saved, self._saved_base_lrs = self._saved_base_lrs, None
            self._base_lrs = saved if saved and len(saved) == len(groups) else [g["lr"] for g in groups]
        return groups

    def _scale_lrs(self, progress: float) -> None:
        groups = self._lr_groups()
        if groups is None:
            return
        self._lr_progress = progress
        assert self._base_lrs is not None
        for group, base in zip(groups, self._base_lrs, strict=True):
            group["lr"] = base * self.strategy.lr_scale(group["name"], progress)

    @contextlib.contextmanager
    def _unscaled_lrs(self) -> Iterator[None]:
        groups = self._lr_groups()
        if groups is None:
            yield
            return
        assert self._base_lrs is not None
        for group, base in zip(groups, self._base_lrs, strict=True):
            group["lr"] = base
        yield
        self._base_lrs = [g["lr"] for g in groups]
        self._scale_lrs(self._lr_progress)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        with self._unscaled_lrs():
            super().lr_scheduler_step(scheduler, metric)

    # -- checkpoints -----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["preprocessing"] = self.preprocessing.to_dict()
        if self.val_acc_best.update_called:
            checkpoint["val_acc_best"] = float(self.val_acc_best.compute())
        checkpoint["arch_kwargs"] = self.net.arch_kwargs
        if self._base_lrs is not None:  # the optimizer state holds base * factor
            checkpoint["base_lrs"] = list(self._base_lrs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compatible(checkpoint.get("hyper_parameters") or {}, dict(self.hparams))
        self._resumed_best = checkpoint.get("val_acc_best")
        self._saved_base_lrs = checkpoint.get("base_lrs")
        if "preprocessing" in checkpoint:
            self.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])

    @classmethod
    def load_for_inference(cls, path: str | Path, map_location: str = "cpu") -> TransferLearningModule:
        """Rebuild from a checkpoint alone: no pretrained weights file or network needed.

        The checkpoint's settings are data: its backbone builder, strategy, optimizer and
        scheduler must be the template's own (:mod:`transfer_learning.run.registry`), with plain
        values; anything else is refused before anything is built."""
        checkpoint = safe_load(path, map_location=map_location)
        hparams = checkpoint.get("hyper_parameters")
        if not isinstance(hparams, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise CheckpointError(
                f"{path} is not a checkpoint of this template (no hyper_parameters/state_dict)."
            )
        source = f"checkpoint {path}"
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "trusted"}
        unknown = sorted(set(hparams) - known)
        if unknown or "model" not in hparams or "strategy" not in hparams:
            raise registry.UnsafeSpecError(
                f"refusing {source}: its hyper_parameters ({sorted(hparams)}) are not this template's "
                f"({sorted(known)})."
            )
        for key, value in hparams.items():  # the four specs are checked by registry.resolve below
            if key not in registry.KINDS:
                registry.check_plain(value, key, source)
        model_cfg = dict(hparams["model"], weights=None)
        if checkpoint.get("arch_kwargs"):
            registry.check_plain(checkpoint["arch_kwargs"], "arch_kwargs", source)
            model_cfg["arch_kwargs"] = checkpoint["arch_kwargs"]
        hparams = {**hparams, "model": model_cfg}
        for kind in ("model", "strategy", "optimizer", "scheduler"):
            spec = hparams.get(kind)
            if kind == "scheduler" and not (spec or {}).get("_target_"):
                continue  # scheduler=constant
            registry.resolve(kind, spec, source)
        module = cls(**hparams, trusted=False)
        module.load_state_dict(checkpoint["state_dict"])
        module.on_load_checkpoint(checkpoint)
        return module.eval()
