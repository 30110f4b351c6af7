"""What scripts/benchmark.py measures the template against, each run in a process of its own
(``--plain``, ``--floor-run``): the hand-written training loop, and the floor of feature
extraction (one decode and one forward pass over every image)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------ (a) the plain loop


def plain_loop(
    strategy: str, data: Path, epochs: int, image_size: int, model: str, bf16: bool = False
) -> dict[str, Any]:
    """The loop people write by hand (``bf16``: its forward pass and loss under bf16 autocast,
    the one change a hand-written loop needs for mixed precision). Runs in its own process."""
    import torch
    from hydra.utils import instantiate
    from torch import nn
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from transfer_learning.run.config import compose_config

    torch.manual_seed(0)
    train_set = ImageFolder(str(data / "train"))
    net = instantiate(compose_config([f"model={model}"]).model, num_classes=len(train_set.classes))
    p = net.preprocessing
    normalize = T.Normalize(p.mean, p.std)
    train_set.transform = T.Compose(
        [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
    )
    val_set = ImageFolder(
        str(data / "val"),
        transform=T.Compose([T.Resize(round(image_size * p.resize_size / p.crop_size)),
                             T.CenterCrop(image_size), T.ToTensor(), normalize]),
    )  # fmt: skip
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True, num_workers=2)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=32, num_workers=2)
    if strategy == "feature_extract":
        for parameter in net.backbone.parameters():
            parameter.requires_grad = False
        optimizer = torch.optim.SGD(net.head.parameters(), lr=1e-2, momentum=0.9)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    accuracies = []
    for _ in range(epochs):
        net.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
        net.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((net(x).argmax(1) == y).sum())
        accuracies.append(correct / len(val_set))
    return {"val_acc": accuracies[-1], "best_val_acc": max(accuracies), "train_images": len(train_set)}


# ------------------------------------------------------------------------------ the floor


def floor_pass(
    data: Path, model: str, image_size: int | None = None, float32: bool = False
) -> dict[str, Any]:
    """One decode and one forward pass over every image under ``data`` (at the model's own input
    size, or ``image_size``): the least any feature extraction of these images can cost, in bf16
    where the hardware runs it natively (``float32``: never). Runs in its own process."""
    import torch
    from hydra.utils import instantiate
    from PIL import Image
    from torch.utils.data import DataLoader

    from transfer_learning.data.images import list_images
    from transfer_learning.data.transforms import build_transforms
    from transfer_learning.hardware import cpu_has_bf16, gpu_has_bf16
    from transfer_learning.run.config import compose_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = not float32 and (gpu_has_bf16() if device.type == "cuda" else cpu_has_bf16())
    files = list_images(data).files  # hidden folders (the template's caches) left out
    net = instantiate(compose_config([f"model={model}"]).model, num_classes=2)
    preprocessing = net.preprocessing.at_size(image_size) if image_size else net.preprocessing
    transform = build_transforms(preprocessing, train=False, augment={})
    backbone = net.backbone.eval().to(device).to(memory_format=torch.channels_last)

    def decode(index: int) -> torch.Tensor:
        with Image.open(files[index]) as image:
            return transform(image.convert("RGB"))

    indices: list[int] = list(range(len(files)))
    loader: DataLoader[int] = DataLoader(
        indices,  # type: ignore[arg-type]
        batch_size=64,
        num_workers=min(8, os.cpu_count() or 1),
        collate_fn=lambda batch: torch.stack([decode(i) for i in batch]),
    )
    count = 0
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for x in loader:
            backbone(x.to(device).contiguous(memory_format=torch.channels_last))
            count += len(x)
    return {"images": count, "bf16": bf16}
