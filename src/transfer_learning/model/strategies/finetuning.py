"""Fine-tuning everything: two learning rates (backbone and head), or one per block (layer decay)."""

from __future__ import annotations

from typing import Any

from transfer_learning.errors import ConfigError
from transfer_learning.model.network import Network
from transfer_learning.model.strategies.base import Strategy, positive, split_decay


class FineTuning(Strategy):
    """Everything trains: the pretrained backbone at ``backbone_lr``, the new head (and auxiliary
    heads) at ``head_lr``. ``freeze_bn_stats`` keeps BatchNorm running statistics pretrained,
    which helps with small batches."""

    name = "finetune"
    lr_names = ("head_lr", "backbone_lr")

    def __init__(
        self,
        head_lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        freeze_bn_stats: bool = False,
        exempt_norm_bias: bool = False,
    ) -> None:
        self.head_lr = positive("head_lr", head_lr)
        self.backbone_lr = positive("backbone_lr", backbone_lr)
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
        self.head_lr = positive("head_lr", head_lr)
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
