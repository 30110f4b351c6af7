"""README "Extending the template": each seam's worked example, run as written, and a strategy
defined in this file alone (cached features, a step before fit) trained through the command line.

The README's examples are copied out of its code blocks (each follows an
``<!-- extending:<seam> file=<path> -->`` marker) into a copy of ``src/``, ``conf/`` and
``train.py``, which then trains with them: what a fork does, with nothing else changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import REPO, run_cli
from transfer_learning.model.network import Network
from transfer_learning.model.strategies import FeatureRequest, Split, Strategy
from transfer_learning.model.strategies.base import positive

MARKER = re.compile(
    r"<!-- extending:(?P<seam>\w+) file=(?P<file>\S+) -->\n```\w*\n(?P<code>.*?)\n```", re.DOTALL
)
TINY = [
    "input.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.verify_images=false",
    "trainer.max_epochs=2",
    "logger=csv",
    "worst_samples=0",
]


def readme_examples() -> dict[str, dict[str, str]]:
    """seam -> {path in the repository: file text}, from README's marked code blocks."""
    examples: dict[str, dict[str, str]] = {}
    for match in MARKER.finditer((REPO / "README.md").read_text()):
        examples.setdefault(match["seam"], {})[match["file"]] = match["code"] + "\n"
    return examples


def test_the_readme_has_an_example_for_each_seam():
    examples = readme_examples()
    assert set(examples) == {"data", "backbone", "strategy"}
    for seam, files in examples.items():
        assert len(files) == 2, seam  # one module, one YAML file
        assert sum(path.startswith("conf/") and path.endswith(".yaml") for path in files) == 1, seam
        assert sum(path.startswith("src/transfer_learning/") and path.endswith(".py") for path in files) == 1
        for path in files:
            assert not (REPO / path).exists(), f"{path}: the example must be new, not a shipped file"


def fork(tmp_path: Path, seam: str) -> Path:
    """A copy of the repository's code and configs with one README example written into it."""
    copy = tmp_path / "fork"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", copy / "src", ignore=ignore)
    shutil.copytree(REPO / "conf", copy / "conf", ignore=ignore)
    shutil.copy2(REPO / "train.py", copy / "train.py")
    for path, text in readme_examples()[seam].items():
        (copy / path).write_text(text)
    return copy


def train_fork(copy: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """``python train.py`` of the copy, its package first on the path."""
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [sys.executable, str(copy / "train.py"), f"paths.root_dir={tmp_path}",
         f"hydra.run.dir={tmp_path}/run", f"paths.feature_cache_dir={tmp_path}/cache", *TINY, *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def finished(tmp_path: Path, result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["test/acc"] <= 1.0
    assert Path(summary["best checkpoint"]).is_file()
    return summary


def checkpoint(summary: dict[str, Any]) -> dict[str, Any]:
    return torch.load(summary["best checkpoint"], map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_the_readme_data_source_example_trains(tmp_path, shapes_dir):
    copy = fork(tmp_path, "data")
    images = tmp_path / "images"  # the listing names the images relative to its own folder
    shutil.copytree(shapes_dir, images)
    listing = images / "labels.jsonl"
    rows = [
        {"path": str(image.relative_to(images)), "label": image.parent.name}
        for image in sorted(images.glob("*/*.jpg"))
    ]
    listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = finished(tmp_path, train_fork(copy, tmp_path, "data=jsonl", f"data.file={listing}"))
    hparams = checkpoint(summary)["hyper_parameters"]
    assert hparams["class_names"] == sorted({row["label"] for row in rows})


@pytest.mark.slow
def test_the_readme_backbone_example_trains(tmp_path, shapes_dir):
    copy = fork(tmp_path, "backbone")
    summary = finished(
        tmp_path,
        train_fork(
            copy,
            tmp_path,
            "data=imagefolder",
            f"data.root={shapes_dir}",
            "model=tiny_cnn",
            "strategy=finetune",
        ),
    )
    saved = checkpoint(summary)
    assert saved["hyper_parameters"]["model"]["_target_"] == "transfer_learning.model.backbones.tiny_cnn"
    assert "net.backbone.0.weight" in saved["state_dict"]  # the example's own first convolution


@pytest.mark.slow
def test_the_readme_strategy_example_trains_and_the_lr_finder_scales_its_rates(tmp_path, shapes_dir):
    copy = fork(tmp_path, "strategy")
    result = train_fork(
        copy, tmp_path, "data=imagefolder", f"data.root={shapes_dir}", "strategy=bitfit", "tune_lr=true",
        "tune_lr_steps=10",
    )  # fmt: skip
    summary = finished(tmp_path, result)
    assert summary["strategy"] == "bitfit"
    # lr_names: the finder handles both of its rates (scaled alike, ratio 1:1, or both kept when a
    # sweep this short finds no suggestion).
    outcome = summary["lr finder"]
    assert re.search(r"head_lr 1\.0e-03 -> (\S+), backbone_lr 1\.0e-03 -> \1$", outcome) or outcome.endswith(
        "kept head_lr=1.0e-03, backbone_lr=1.0e-03"
    ), outcome
    saved = checkpoint(summary)
    assert (
        saved["hyper_parameters"]["strategy"]["_target_"]
        == "transfer_learning.model.strategies.bitfit.BitFit"
    )
    groups = {group["name"] for group in saved["optimizer_states"][0]["param_groups"]}
    assert groups == {"backbone", "head"}


# -- a strategy defined here alone -----------------------------------------------------------


class CentroidHead(Strategy):
    """A frozen backbone; the head starts as the normalised class centroids of the cached
    training features (a step before fit), then trains on cached features. Defined in this test
    file only: one class plus one YAML file (written by the test) make it a ``strategy=`` option."""

    name = "centroid_head"
    uses_loss_weights = False

    def __init__(self, head_lr: float = 0.05, scale: float = 10.0) -> None:
        self.head_lr = positive("head_lr", head_lr)
        self.scale = float(scale)

    def training_features(self) -> FeatureRequest | None:
        return FeatureRequest()  # one exact view per image, float32

    def features_before_fit(self) -> FeatureRequest | None:
        return FeatureRequest(splits=("train",))

    def before_fit(
        self, net: Network, features: dict[str, Split], multilabel: bool
    ) -> dict[str, float] | None:
        x, y = features["train"]
        x = torch.nn.functional.normalize(x.float(), dim=1)
        targets = y.float() if multilabel else torch.nn.functional.one_hot(y, net.head.out_features).float()
        centroids = torch.nn.functional.normalize(targets.T @ x, dim=1)
        with torch.no_grad():
            net.head.weight.copy_(self.scale * centroids)
            net.head.bias.zero_()
        accuracy = float((net.head(x).argmax(1) == y).float().mean()) if not multilabel else float("nan")
        return {"centroid train acc": accuracy}

    def prepare(self, net: Network) -> None:
        net.drop_aux()
        net.freeze_backbone()

    def param_groups(self, net: Network) -> list[dict[str, Any]]:
        return [{"name": "head", "params": list(net.head_parameters()), "lr": self.head_lr}]


@pytest.mark.slow
def test_a_strategy_defined_in_a_test_file_trains_on_cached_features_from_the_command_line(
    tmp_path, shapes_dir
):
    configs = tmp_path / "my_conf"
    (configs / "strategy").mkdir(parents=True)
    (configs / "strategy" / "centroid_head.yaml").write_text(
        "_target_: test_extending.CentroidHead\nhead_lr: 0.05\nscale: 10.0\n"
    )
    cache = tmp_path / "cache"
    result = run_cli(
        tmp_path, f"hydra.searchpath=[file://{configs}]", "strategy=centroid_head", "data=imagefolder",
        f"data.root={shapes_dir}", f"paths.feature_cache_dir={cache}", *TINY,
        env={"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    summary = finished(tmp_path, result)
    assert summary["strategy"] == "centroid_head"
    assert summary["linear probe"].startswith("centroid train acc")  # what before_fit returned
    output = result.stdout + result.stderr
    assert re.search(r"strategy=centroid_head, before fit: centroid train acc \d", output), output[-3000:]
    assert any(cache.rglob("*")), "the training features came from the feature cache"
    saved = checkpoint(summary)
    assert saved["hyper_parameters"]["strategy"]["_target_"] == "test_extending.CentroidHead"
