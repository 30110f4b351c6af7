"""Gradual unfreezing: the head first on a frozen body, then the body, stage by stage."""

from __future__ import annotations

from typing import Any

from torch import nn

from transfer_learning.errors import ConfigError
from transfer_learning.model.network import Network
from transfer_learning.model.strategies.base import Strategy, positive, split_decay


def _stage_sizes(blocks: int, stages: int) -> list[int]:
    """``blocks`` split into ``stages`` runs of consecutive blocks, top first; upper stages take
    the remainder."""
    size, extra = divmod(blocks, stages)
    return [size + (1 if i < extra else 0) for i in range(stages)]


class GradualUnfreeze(Strategy):
    """Train the head on a frozen body for ``freeze_epochs``, then unfreeze the body: all at
    once (``stages=1``), or in ``stages`` runs of blocks from the top, one run every
    ``epochs_per_stage`` epochs. A stage's learning rate starts at ``ramp_from * head_lr`` when it
    unfreezes and rises linearly to ``backbone_lr`` over ``ramp_epochs``. The defaults follow
    fastai's ``fine_tune``: one frozen epoch, then every layer with a smaller rate for the body.

    Every param group exists from the start (``backbone`` or ``backbone/stage<i>``, stage 1 the
    top, and ``head``), and every parameter requires gradients when the optimizer and DDP are set
    up; a frozen stage is switched off per epoch (``requires_grad=False`` and eval mode: pretrained
    BatchNorm statistics) and its learning rate scaled to 0. The frozen blocks are the lowest ones,
    so autograd records nothing for them: a frozen epoch costs what a feature-extraction epoch
    costs. Under DDP, parameters without gradients are reported as unused
    (``find_unused_parameters``) and everything that trains is gradient-synchronised.
    """

    name = "gradual_unfreeze"
    lr_names = ("head_lr", "backbone_lr")
    changes_what_trains = True

    def __init__(
        self,
        head_lr: float = 2e-3,
        backbone_lr: float = 2e-4,
        freeze_epochs: int = 1,
        stages: int = 1,
        epochs_per_stage: int = 1,
        ramp_from: float = 0.01,
        ramp_epochs: float = 1.0,
        freeze_bn_stats: bool = True,
        exempt_norm_bias: bool = False,
    ) -> None:
        self.head_lr = positive("head_lr", head_lr)
        self.backbone_lr = positive("backbone_lr", backbone_lr)
        for key, value, low in (("freeze_epochs", freeze_epochs, 0), ("stages", stages, 1),
                                ("epochs_per_stage", epochs_per_stage, 1)):  # fmt: skip
            if int(value) != value or value < low:
                raise ConfigError(f"strategy.{key}={value}: a whole number, {low} or more.")
        if not ramp_from > 0 or ramp_epochs < 0:
            raise ConfigError(
                f"strategy.ramp_from={ramp_from}, strategy.ramp_epochs={ramp_epochs}: the body starts at "
                "a positive fraction of head_lr and reaches backbone_lr after 0 or more epochs."
            )
        self.freeze_epochs = int(freeze_epochs)
        self.stages = int(stages)
        self.epochs_per_stage = int(epochs_per_stage)
        self.ramp_from = float(ramp_from)
        self.ramp_epochs = float(ramp_epochs)
        self.freeze_bn_stats = bool(freeze_bn_stats)
        self.exempt_norm_bias = bool(exempt_norm_bias)

    def unfreeze_epochs(self) -> list[int]:
        """The epoch in which each stage starts training, top stage first."""
        return [self.freeze_epochs + i * self.epochs_per_stage for i in range(self.stages)]

    def _stage_blocks(self, net: Network) -> list[list[tuple[str, list[nn.Parameter]]]]:
        """The body's blocks by stage, top stage first, each stage's blocks input side first."""
        blocks = net.blocks()
        if self.stages > len(blocks):
            raise ConfigError(
                f"strategy.stages={self.stages}: this backbone has {len(blocks)} blocks "
                f"({', '.join(n for n, _ in blocks)}); use at most {len(blocks)} stages."
            )
        out, end = [], len(blocks)
        for size in _stage_sizes(len(blocks), self.stages):
            out.append(blocks[end - size : end])
            end -= size
        return out

    def _group_name(self, stage: int) -> str:
        return "backbone" if self.stages == 1 else f"backbone/stage{stage + 1}"

    def prepare(self, net: Network) -> None:
        # Everything trainable when the optimizer and DDP see the network; epochs switch stages off.
        net.unfreeze_backbone(freeze_norm_stats=self.freeze_bn_stats)

    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        groups = [
            {
                "name": self._group_name(i),
                "params": [p for _, ps in stage for p in ps],
                "lr": self.backbone_lr,
            }
            for i, stage in enumerate(self._stage_blocks(net))
        ]
        groups.append({"name": "head", "params": list(net.head_parameters()), "lr": self.head_lr})
        return split_decay(groups, self.exempt_norm_bias)

    def frozen_blocks(self, net: Network, epoch: int) -> int:
        """How many of the lowest blocks are frozen in ``epoch``."""
        stages = self._stage_blocks(net)
        return sum(len(s) for s, start in zip(stages, self.unfreeze_epochs(), strict=True) if start > epoch)

    def on_epoch_start(self, net: Network, epoch: int) -> None:
        net.freeze_lowest_blocks(self.frozen_blocks(net, epoch), freeze_norm_stats=self.freeze_bn_stats)

    def lr_scale(self, group: str, progress: float) -> float:
        name = group.removesuffix("/no_decay")
        if name == "head":
            return 1.0
        stage = 0 if name == "backbone" else int(name.rsplit("stage", 1)[1]) - 1
        since = progress - self.unfreeze_epochs()[stage]
        if since < 0:
            return 0.0
        start = self.ramp_from * self.head_lr / self.backbone_lr
        if self.ramp_epochs == 0 or since >= self.ramp_epochs:
            return 1.0
        return start + (1.0 - start) * since / self.ramp_epochs

    def check_epochs(self, max_epochs: int) -> str | None:
        starts = self.unfreeze_epochs()
        if max_epochs < 0 or starts[-1] < max_epochs:
            return None
        if starts[0] >= max_epochs:
            return (
                f"strategy.freeze_epochs={self.freeze_epochs} with trainer.max_epochs={max_epochs}: the body "
                "never unfreezes, so this run is feature extraction without the feature cache. Train "
                "longer, lower strategy.freeze_epochs, or use strategy=feature_extract."
            )
        late = sum(1 for s in starts if s >= max_epochs)
        return (
            f"strategy.stages={self.stages} unfreeze in epochs {starts}, but trainer.max_epochs="
            f"{max_epochs}: {late} stage(s) never train. Lower strategy.stages or "
            "strategy.epochs_per_stage, or train longer."
        )
