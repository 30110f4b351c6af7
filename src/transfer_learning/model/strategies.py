"""Transfer-learning strategies: what trains, at which learning rate, and in which mode.

Every param group is built up front from the backbone/head split, so the optimizer, its
schedule and DDP see the same groups from the first step to the last. Strategies that change
what trains during a run (``gradual_unfreeze``) do it by epoch, from the epoch number alone, so a
resumed run is in the same state as one that never stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from transfer_learning.errors import ConfigError
from transfer_learning.model.network import Network


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ConfigError(f"strategy.{name}={value}: a learning rate must be positive.")
    return float(value)


def split_decay(groups: list[dict[str, Any]], exempt_norm_bias: bool) -> list[dict[str, Any]]:
    """With ``exempt_norm_bias``, each group becomes two: its weights, and its biases and
    normalisation parameters (every parameter with fewer than two dimensions) under
    ``<name>/no_decay`` with ``weight_decay=0``. Without, the groups as they are."""
    if not exempt_norm_bias:
        return groups
    out = []
    for group in groups:
        params = group["params"]
        decayed = [p for p in params if p.ndim >= 2]
        exempt = [p for p in params if p.ndim < 2]
        if decayed:
            out.append({**group, "params": decayed})
        if exempt:
            out.append({**group, "name": f"{group['name']}/no_decay", "params": exempt, "weight_decay": 0.0})
    return out


class Strategy(ABC):
    """Prepares a network for training and hands the optimizer its param groups."""

    name: str

    @abstractmethod
    def prepare(self, net: Network) -> None:
        """Decide what trains: freeze or unfreeze the backbone, keep or drop auxiliary heads."""

    @abstractmethod
    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        """Optimizer param groups, each with a ``name`` and its own ``lr``."""

    #: True when what trains changes during the run: the parameters that do not train in an epoch
    #: get no gradient, so DDP must be told that some parameters may be unused, and the module
    #: applies :meth:`lr_scale` on top of the schedule.
    changes_what_trains = False

    def on_epoch_start(self, net: Network, epoch: int) -> None:
        """Set what trains in ``epoch`` (the same whether the run started there or resumed)."""
        return None

    def lr_scale(self, group: str, progress: float) -> float:
        """Factor on the scheduled learning rate of param group ``group`` at ``progress`` (epochs
        since the start, fractional within an epoch); 0 for a group that does not train yet."""
        return 1.0

    def check_epochs(self, max_epochs: int) -> str | None:
        """What goes wrong with an epoch budget this strategy cannot use (a warning), else None."""
        return None


class FeatureExtraction(Strategy):
    """Frozen pretrained backbone (kept in eval mode, so BatchNorm statistics stay pretrained);
    only the new head trains. Auxiliary classifiers are dropped: a backbone in eval mode never
    feeds them."""

    name = "feature_extract"

    def __init__(
        self,
        head_lr: float = 1e-2,
        cache_features: bool = True,
        cached_views: int = 1,
        bf16: bool | None = None,
        backbone_lr: float | None = None,
    ) -> None:
        """``cache_features``: run the frozen backbone once per image and train the head on
        stored features (``cached_views`` augmented views per training image; 1 is exact).
        ``bf16``: autocast the backbone's forward pass to bfloat16; None decides from the
        hardware (GPUs and CPUs with AVX-512 BF16 or AMX). ``backbone_lr`` has no effect (nothing
        in the backbone trains); it is accepted so that one search space (hparams_search=optuna)
        can sweep both strategies."""
        del backbone_lr
        self.head_lr = _positive("head_lr", head_lr)
        if cached_views < 1:
            raise ConfigError(f"strategy.cached_views={cached_views}: at least one view per image.")
        self.cache_features = bool(cache_features)
        self.cached_views = int(cached_views)
        self.bf16 = bf16

    def prepare(self, net: Network) -> None:
        net.drop_aux()
        net.freeze_backbone()

    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        return [{"name": "head", "params": list(net.head_parameters()), "lr": self.head_lr}]


class FineTuning(Strategy):
    """Everything trains: the pretrained backbone at ``backbone_lr``, the new head (and auxiliary
    heads) at ``head_lr``. ``freeze_bn_stats`` keeps BatchNorm running statistics pretrained,
    which helps with small batches."""

    name = "finetune"

    def __init__(
        self,
        head_lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        freeze_bn_stats: bool = False,
        exempt_norm_bias: bool = False,
    ) -> None:
        self.head_lr = _positive("head_lr", head_lr)
        self.backbone_lr = _positive("backbone_lr", backbone_lr)
        self.freeze_bn_stats = bool(freeze_bn_stats)
        self.exempt_norm_bias = bool(exempt_norm_bias)

    def prepare(self, net: Network) -> None:
        net.unfreeze_backbone(freeze_norm_stats=self.freeze_bn_stats)

    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        groups = [
            {"name": "backbone", "params": list(net.backbone_parameters()), "lr": self.backbone_lr},
            {"name": "head", "params": list(net.head_parameters()), "lr": self.head_lr},
        ]
        return split_decay(groups, self.exempt_norm_bias)


class LayerDecay(Strategy):
    """Fine-tuning with layer-wise learning-rate decay: the head trains at ``head_lr``, and
    each backbone block (see :meth:`Network.blocks`) at ``head_lr * decay ** depth``, depth 1
    being the block next to the head. Lower layers hold the most general features and move the
    least. One param group per block (``block/<name>``), built up front: nothing changes during
    training, so DDP and resuming see the same groups throughout."""

    name = "layer_decay"

    def __init__(
        self,
        head_lr: float = 1e-3,
        decay: float = 0.7,
        freeze_bn_stats: bool = False,
        exempt_norm_bias: bool = False,
    ) -> None:
        self.head_lr = _positive("head_lr", head_lr)
        if not 0 < decay <= 1:
            raise ConfigError(f"strategy.decay={decay}: the per-block factor must be in (0, 1].")
        self.decay = float(decay)
        self.freeze_bn_stats = bool(freeze_bn_stats)
        self.exempt_norm_bias = bool(exempt_norm_bias)

    def prepare(self, net: Network) -> None:
        net.unfreeze_backbone(freeze_norm_stats=self.freeze_bn_stats)

    def block_lrs(self, net: Network) -> dict[str, float]:
        """Learning rate of each block, input side first."""
        blocks = net.blocks()
        return {name: self.head_lr * self.decay ** (len(blocks) - i) for i, (name, _) in enumerate(blocks)}

    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        rates = self.block_lrs(net)
        groups = [
            {"name": f"block/{name}", "params": params, "lr": rates[name]} for name, params in net.blocks()
        ]
        groups.append({"name": "head", "params": list(net.head_parameters()), "lr": self.head_lr})
        return split_decay(groups, self.exempt_norm_bias)


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
        self.head_lr = _positive("head_lr", head_lr)
        self.backbone_lr = _positive("backbone_lr", backbone_lr)
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


class LinearProbeFineTune(FineTuning):
    """LP-FT (Kumar et al., 2022): first fit the new head to convergence on the frozen features
    (a linear probe: L-BFGS on cached features, its L2 strength chosen on the validation split,
    about the cost of one forward pass over the data), then fine-tune everything at small rates.
    Starting from a good head, fine-tuning moves the pretrained features less than it does from
    a random head, which helps most when the new data differ from the old."""

    name = "lp_ft"

    def __init__(
        self,
        head_lr: float = 1e-4,
        backbone_lr: float = 1e-4,
        probe_weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2),
        probe_steps: int = 200,
        freeze_bn_stats: bool = True,
        exempt_norm_bias: bool = False,
    ) -> None:
        super().__init__(head_lr, backbone_lr, freeze_bn_stats, exempt_norm_bias)
        self.probe_weight_decays = [float(w) for w in probe_weight_decays]
        if not self.probe_weight_decays or any(w < 0 for w in self.probe_weight_decays):
            raise ConfigError(
                f"strategy.probe_weight_decays={list(probe_weight_decays)}: one or more L2 strengths, "
                "each >= 0."
            )
        if probe_steps < 1:
            raise ConfigError(f"strategy.probe_steps={probe_steps}: at least 1 L-BFGS step.")
        self.probe_steps = int(probe_steps)

    def fit_probe(
        self,
        head: nn.Linear,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
    ) -> dict[str, float]:
        """Fit ``head`` (in place) on ``train`` features and labels, once per L2 strength, and keep
        the one with the lowest validation loss. Returns what was chosen and its scores."""
        return fit_linear_head(head, train, val, self.probe_weight_decays, self.probe_steps)


def fit_linear_head(
    head: nn.Linear,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    weight_decays: Sequence[float],
    steps: int,
) -> dict[str, float]:
    """Multinomial logistic regression on fixed features with full-batch L-BFGS, in float64 for a
    clean optimum; the L2 strength with the lowest validation loss wins and its weights are
    copied into ``head``."""
    x, y = train[0].double(), train[1]
    vx, vy = val[0].double(), val[1]
    best: dict[str, Any] = {}
    for decay in weight_decays:
        weight = torch.zeros(head.out_features, head.in_features, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(head.out_features, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            lr=1,
            max_iter=steps,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def closure(
            w: torch.Tensor = weight, b: torch.Tensor = bias, d: float = decay, opt: Any = optimizer
        ) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * d * w.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            logits = vx @ weight.T + bias
            val_loss = float(nn.functional.cross_entropy(logits, vy))
            val_acc = float((logits.argmax(1) == vy).double().mean())
            train_acc = float(((x @ weight.T + bias).argmax(1) == y).double().mean())
        if not best or val_loss < best["val_loss"]:
            best = {"weight_decay": decay, "val_loss": val_loss, "val_acc": val_acc, "train_acc": train_acc,
                    "weight": weight.detach(), "bias": bias.detach()}  # fmt: skip
    with torch.no_grad():
        head.weight.copy_(best.pop("weight").to(head.weight))
        head.bias.copy_(best.pop("bias").to(head.bias))
    return best
