"""The network every strategy works with: a pretrained ``backbone`` plus a new ``head``.

Words used throughout the package: the *backbone* is the pretrained network with its
classifier replaced by ``nn.Identity`` (it returns features; ``strategy.backbone_lr`` and the
``backbone`` param group mean it); the *head* is the new layer sized to the user's classes;
the *network* is both together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from transfer_learning.errors import ConfigError
from transfer_learning.lightning_internals import keeps_running_stats
from transfer_learning.preprocessing import Preprocessing

# Auxiliary classifiers (Inception-v3, GoogLeNet), in the order the model returns their logits.
AUX_ATTRS = ("AuxLogits", "aux2", "aux1")


class Network(nn.Module):
    """``backbone`` -> features -> ``head`` -> class logits.

    ``aux_heads`` hold the re-sized auxiliary classifiers of Inception-v3 / GoogLeNet; the
    backbone hands them their input features in training mode only. ``pretrained`` says whether
    the backbone carries trained weights (False for ``model.weights=null``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        num_classes: int,
        preprocessing: Preprocessing,
        pretrained: bool,
        aux_heads: list[nn.Module] | None = None,
        aux_loss_weight: float = 0.0,
        arch_kwargs: dict[str, Any] | None = None,
        aux_min_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: a classifier needs at least 2 classes.")
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)
        self.aux_heads = nn.ModuleList(aux_heads or [])
        self.pretrained = pretrained
        self.weights_preprocessing = preprocessing
        self.aux_min_size = aux_min_size
        self.aux_loss_weight = aux_loss_weight
        # Architecture settings the builder derived from the weights (GoogLeNet's transform_input):
        # stored in checkpoints so the same network is rebuilt without the weights file.
        self.arch_kwargs = dict(arch_kwargs or {})
        self._backbone_frozen = False
        self._norm_stats_frozen = False
        self._frozen_blocks: list[nn.Module] = []  # the lowest blocks while unfreezing gradually

    @property
    def preprocessing(self) -> Preprocessing:
        """The weights' preprocessing; its minimum size is raised while auxiliary heads train."""
        p = self.weights_preprocessing
        if len(self.aux_heads) and self.aux_min_size and self.aux_min_size > p.min_size:
            note = (
                f" while its auxiliary classifiers train (model.aux_loss_weight=0 lowers it to {p.min_size})"
            )
            return replace(p, min_size=self.aux_min_size, min_size_note=note)
        return p

    # -- forward ---------------------------------------------------------------------------

    def _backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.backbone(x)
        if isinstance(out, torch.Tensor):
            return out, []
        features, *aux = out  # torchvision's InceptionOutputs / GoogLeNetOutputs
        return features, [a for a in aux if a is not None]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._backbone(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits plus auxiliary logits (non-empty only in training mode)."""
        features, aux_features = self._backbone(x)
        aux = [head(f) for head, f in zip(self.aux_heads, aux_features, strict=False)]
        return self.head(features), aux

    # -- what trains -----------------------------------------------------------------------

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def blocks(self) -> list[tuple[str, list[nn.Parameter]]]:
        """The backbone's trainable parts in depth order, input side first: its children, with
        any child that holds most of the parameters (torchvision's ``features``, ViT's
        ``encoder.layers``, timm's ``blocks``) opened up into its own children. Every backbone
        parameter is in exactly one block; the blocks are what layer-wise learning rates and
        block-by-block unfreezing act on."""
        return [(name, list(module.parameters())) for name, module in backbone_blocks(self.backbone)]

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Newly initialised parameters: the head and any auxiliary heads."""
        yield from self.head.parameters()
        yield from self.aux_heads.parameters()

    def drop_aux(self) -> None:
        """Remove auxiliary classifiers: the backbone stops computing their inputs."""
        self.aux_heads = nn.ModuleList()
        self.aux_loss_weight = 0.0
        for attr in AUX_ATTRS:
            if getattr(self.backbone, attr, None) is not None:
                setattr(self.backbone, attr, None)
        if hasattr(self.backbone, "aux_logits"):
            setattr(self.backbone, "aux_logits", False)  # noqa: B010

    def freeze_backbone(self) -> None:
        """No gradients for the backbone, and eval mode for it whenever the network trains, so
        BatchNorm statistics and dropout stay as pretrained."""
        self.backbone.requires_grad_(False)
        self._backbone_frozen, self._norm_stats_frozen = True, False
        self._frozen_blocks = []
        self.train(self.training)

    def unfreeze_backbone(self, freeze_norm_stats: bool = False) -> None:
        """Train every parameter; ``freeze_norm_stats`` keeps BatchNorm running statistics
        pretrained (those layers stay in eval mode) while their affine weights still train."""
        self.requires_grad_(True)
        self._backbone_frozen, self._norm_stats_frozen = False, freeze_norm_stats
        self._frozen_blocks = []
        self.train(self.training)

    def freeze_lowest_blocks(self, count: int, freeze_norm_stats: bool = False) -> None:
        """Gradual unfreezing: the ``count`` blocks nearest the input (see :meth:`blocks`) get no
        gradients and stay in eval mode (pretrained BatchNorm statistics, no dropout); the blocks
        above them and the heads train. Frozen blocks form the bottom of the network, so autograd
        records nothing for them: they cost a forward pass and no backward work. ``count`` equal to
        the number of blocks freezes the whole backbone (auxiliary heads are kept, unlike
        :meth:`freeze_backbone`: they train once the backbone does)."""
        blocks = backbone_blocks(self.backbone)
        if not 0 <= count <= len(blocks):
            raise ValueError(f"count={count}: the backbone has {len(blocks)} blocks.")
        self.requires_grad_(True)
        for _, module in blocks[:count]:
            module.requires_grad_(False)
        self._frozen_blocks = [module for _, module in blocks[:count]]
        self._backbone_frozen = count == len(blocks)
        self._norm_stats_frozen = freeze_norm_stats
        self.train(self.training)

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def train(self, mode: bool = True) -> Network:
        super().train(mode)
        if mode and self._backbone_frozen:
            self.backbone.eval()
            return self
        if mode:
            for block in self._frozen_blocks:
                block.eval()
        if mode and self._norm_stats_frozen:
            for module in self.backbone.modules():
                if keeps_running_stats(module):
                    module.eval()
        return self


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backbone_blocks(backbone: nn.Module, share: float = 0.5) -> list[tuple[str, nn.Module]]:
    """Depth-ordered blocks of a backbone (see :meth:`Network.blocks`): children with parameters;
    a child holding more than ``share`` of them is replaced by its own children, recursively.
    Parameters registered directly on a module that is opened up (ViT's class token and position
    embedding) form a block of their own, placed first."""
    total = _size(backbone)
    blocks: list[tuple[str, nn.Module]] = []

    def expand(prefix: str, module: nn.Module) -> None:
        own = [p for p in module.parameters(recurse=False)]
        children = [(n, c) for n, c in module.named_children() if _size(c) > 0]
        big = total > 0 and _size(module) > share * total
        if (big and len(children) > 1) or (big and len(children) == 1 and not own):
            if own:
                holder = nn.Module()
                for i, parameter in enumerate(own):
                    holder.register_parameter(f"p{i}", parameter)
                blocks.append((f"{prefix}(own)" if prefix else "(own)", holder))
            for name, child in children:
                expand(f"{prefix}.{name}" if prefix else name, child)
        elif _size(module) > 0:
            blocks.append((prefix or "backbone", module))

    expand("", backbone)
    return blocks
