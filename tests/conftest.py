from __future__ import annotations

import os
from pathlib import Path

import pytest
from forkrun import start_forkserver

# torch and the package are imported where they are used: the xdist controller loads this file
# too, and only hands out tests.

# huggingface_hub reads this once, at import (timm imports it): set it before any test module loads.
os.environ["HF_HUB_OFFLINE"] = "1"
# Any download attempt fails at once (connection refused), on machines with or without network.
DEAD_PROXY = "http://127.0.0.1:9"


def pytest_sessionstart(session: pytest.Session) -> None:
    """The forkserver that runs the tests' command lines imports torch and Lightning while the
    first tests run (in each xdist worker, not in the controller that only hands out tests)."""
    if hasattr(session.config, "workerinput"):
        # Each xdist worker, and every process it starts, gets one core's worth of threads.
        os.environ["OMP_NUM_THREADS"] = "1"
    if hasattr(session.config, "workerinput") or not session.config.getoption("numprocesses", None):
        start_forkserver()


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
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five classes of 16 generated 48 px JPEGs, one folder per class (read-only for tests)."""
    from transfer_learning.data.demo import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("data") / "shapes", images_per_class=16, image_size=48)


@pytest.fixture(scope="session")
def multilabel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 generated 48 px JPEGs with 1 to 3 of five shapes each, and their labels.csv (path,
    labels: the shapes separated by spaces); read-only for tests."""
    from transfer_learning.data.demo import generate_multilabel_shapes

    return generate_multilabel_shapes(tmp_path_factory.mktemp("data") / "multi", images=90, image_size=48)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> Path:
    """The folder of one real `python train.py` run on shapes_dir (48 px, one epoch, CSV
    logger, no pictures of mistakes), trained once for the tests that need a run or its
    checkpoints. Read-only: a test that writes next to it works on a copy."""
    from helpers import finished_run

    overrides = ["input.image_size=48", "trainer.max_epochs=1", "logger=csv", "worst_samples=0"]
    return finished_run(tmp_path_factory.mktemp("trained_run"), f"data.root={shapes_dir}", *overrides)


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory, multilabel_dir: Path) -> Path:
    """The folder of one real multi-label `python train.py` run on multilabel_dir (48 px, one
    epoch, CSV logger); read-only like trained_run."""
    from helpers import finished_run

    data = ["data=csv", f"data.file={multilabel_dir / 'labels.csv'}", "data.label_column=labels"]
    extra = [
        "task=multilabel",
        "input.image_size=48",
        "trainer.max_epochs=1",
        "logger=csv",
        "worst_samples=0",
    ]
    return finished_run(tmp_path_factory.mktemp("ml_run"), *data, *extra)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first, the quick ones after them (each group in file order):
    parallel workers then finish together, the quick tests filling the gaps, instead of one
    worker starting a minute-long test while the other has nothing left."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
