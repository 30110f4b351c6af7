"""`python scripts/list_backbones.py` lists every backbone with the facts needed to choose one."""

from __future__ import annotations

import runpy
from pathlib import Path

from transfer_learning.model.backbones import torchvision_names

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "list_backbones.py"


def rows_by_model(text: str) -> dict[str, str]:
    return {
        line.split()[0]: line for line in text.splitlines() if line and not line.startswith(("-", "model"))
    }


def test_lists_every_torchvision_classifier_and_the_bundled_default(capsys):
    runpy.run_path(str(SCRIPT), run_name="list_backbones")["main"]([])
    rows = rows_by_model(capsys.readouterr().out)
    assert set(torchvision_names()) | {"efficientnet_lite0"} <= set(rows)
    resnet50 = rows["resnet50"].split()
    assert resnet50[1:5] == ["25.6M", "80.86", "232->224", "IMAGENET1K_V2"]
    assert rows["inception_v3"].split()[3] == "342->299"
    assert rows["efficientnet_b7"].split()[3] == "600->600"
    lite0 = rows["efficientnet_lite0"].split()
    assert (
        lite0[1:4] == ["4.7M", "75.10", "256->224"]
        and "model=efficientnet_lite0" in rows["efficientnet_lite0"]
    )


def test_sorting_by_top1_puts_the_most_accurate_first(capsys):
    runpy.run_path(str(SCRIPT), run_name="list_backbones")["main"](["--sort", "top1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "model=" in line]
    top1 = [float(line.split()[2]) for line in lines]
    assert top1 == sorted(top1, reverse=True) and lines[0].startswith("vit_h_14")


def test_sorting_by_params_puts_the_smallest_first(capsys):
    runpy.run_path(str(SCRIPT), run_name="list_backbones")["main"](["--sort", "params"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "model=" in line]
    params = [float(line.split()[1].rstrip("M")) for line in lines]
    assert params == sorted(params) and lines[0].split()[0] == "squeezenet1_1"


def test_timm_rows_count_parameters_and_say_top1_is_not_published(capsys):
    runpy.run_path(str(SCRIPT), run_name="list_backbones")["main"](["--timm", "resnet18.*"])
    out = capsys.readouterr().out
    rows = rows_by_model(out)
    timm_row = rows["resnet18.a1_in1k"].split()
    assert timm_row[1:4] == ["11.7M", "n/a", "235->224"]  # timm's resnet18: 11.69M parameters
    assert "timm publishes no top-1" in out
