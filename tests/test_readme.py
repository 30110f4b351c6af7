"""Every `python train.py ...` line of README.md, run as written from a fresh working directory.

Only the work is shrunk (one short epoch, small batches and images, a small demo data set made
up front); no path is overridden, so the outputs land where a user's would. What a user would
have already is provided the way a user would have it: $HOME/data/birds for the "your own
images" lines, torchvision weights in $TORCH_HOME's cache, and the CPU for `trainer=gpu` on a
machine without a GPU.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO
from transfer_learning.backbones.torchvision_models import torchvision_cache_file
from transfer_learning.config import CONF_DIR
from transfer_learning.demo import generate_shapes

SHRINK = [
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
    "data.batch_size=8",
    "data.image_size=64",
    "data.num_workers=0",
]


def readme_commands() -> list[str]:
    """`python train.py` lines of the README's code blocks, without trailing comments."""
    commands, in_block = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and line.startswith("python train.py"):
            commands.append(re.sub(r"\s+#.*$", "", line).strip())
    return commands


def jobs(command: str) -> int:
    """How many runs a command starts: the product of comma-separated sweep values."""
    if " -m " not in f"{command} ":
        return 1
    values = [arg.split("=", 1)[1] for arg in command.split()[3:] if "=" in arg]
    return len(list(itertools.product(*(v.split(",") for v in values))))


def place_torchvision_weights(command: str) -> None:
    """A downloaded-weights file for `model=<torchvision config>` (random tensors, right shapes)."""
    from torchvision.models import get_model, get_model_weights

    for name in re.findall(r"\bmodel=(\w+)", command):
        if "- torchvision" not in (CONF_DIR / "model" / f"{name}.yaml").read_text():
            continue
        path = torchvision_cache_file(get_model_weights(name).DEFAULT)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(get_model(name, weights=None).state_dict(), path)


def test_the_readme_shows_the_commands_users_need():
    commands = readme_commands()
    assert len(commands) >= 10
    for needed in ("strategy=feature_extract", " -m ", "data.root=$HOME", "trainer=ddp", "ckpt_path="):
        assert any(needed in c for c in commands), needed


@pytest.mark.slow
def test_every_readme_train_command_works_as_written(tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    generate_shapes(work / "data" / "demo_shapes", images_per_class=8, image_size=64)
    generate_shapes(home / "data" / "birds", images_per_class=8, image_size=64, classes=("hexagon", "star"))
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PROJECT_ROOT", None)
    seen: set[Path] = set()
    for command in readme_commands():
        place_torchvision_weights(command)
        line = command.replace("python train.py", f"python {REPO / 'train.py'}", 1)
        if "<date>" in line:  # the run folder of the latest run with a last.ckpt
            last = sorted((work / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))[-1]
            line = line.replace("<date>", last.parents[1].name)
        extra = SHRINK + (
            ["trainer.accelerator=cpu"] if "trainer=gpu" in line and not torch.cuda.is_available() else []
        )
        result = subprocess.run(
            ["bash", "-c", f"{line} {' '.join(extra)}"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{command}\n{output[-4000:]}"
        assert "Traceback" not in output, command

        summaries = set((work / "logs").rglob("summary.json")) - seen
        seen |= summaries
        assert len(summaries) == jobs(command), command
        for path in summaries:
            summary = json.loads(path.read_text())
            assert 0 <= summary["test/acc"] <= 1, command
            for key, value in summary.items():  # every file or folder the summary names exists
                if isinstance(value, str) and value.startswith("/"):
                    assert Path(value.split()[0]).exists(), (command, key, value)
