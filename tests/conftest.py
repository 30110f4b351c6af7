from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from transfer_learning.data.demo import generate_multilabel_shapes, generate_shapes

# huggingface_hub reads this once, at import (timm imports it): set it before any test module loads.
os.environ["HF_HUB_OFFLINE"] = "1"
# Any download attempt fails at once (connection refused), on machines with or without network.
DEAD_PROXY = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test reads or writes the user's caches, logs in to W&B, or reaches the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Offline runs stage their artifacts (tables, checkpoints) here until synced: not in ~/.local.
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path_factory.mktemp("wandb_data")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, DEAD_PROXY)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five classes of 16 generated 48 px JPEGs, one folder per class (read-only for tests)."""
    return generate_shapes(tmp_path_factory.mktemp("data") / "shapes", images_per_class=16, image_size=48)


@pytest.fixture(scope="session")
def multilabel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 generated 48 px JPEGs with 1 to 3 of five shapes each, and their labels.csv (path,
    labels: the shapes separated by spaces); read-only for tests."""
    return generate_multilabel_shapes(tmp_path_factory.mktemp("data") / "multi", images=90, image_size=48)
