"""Every option of every config group composes, and its objects can be built."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=False)


def targets(node) -> list[str]:
    """Every ``_target_`` in a plain (unresolved) config tree."""
    if isinstance(node, dict):
        own = [node["_target_"]] if "_target_" in node else []
        return own + [t for value in node.values() for t in targets(value)]
    if isinstance(node, list):
        return [t for item in node for t in targets(item)]
    return []


def test_default_config_is_the_offline_path():
    cfg = compose_train()
    assert cfg.model._target_ == "transfer_learning.backbones.efficientnet_lite0"
    assert cfg.model.weights == "bundled"
    assert cfg.strategy._target_ == "transfer_learning.strategies.FeatureExtraction"
    assert cfg.data.generate is not None and set(cfg.logger) == {"csv", "wandb"}


@pytest.mark.parametrize(
    "override",
    [
        f"{group}={name}"
        for group in ("model", "strategy", "data", "trainer", "logger", "callbacks")
        for name in options(group)
    ]
    + [f"experiment={name}" for name in options("experiment")]
    + [f"debug={name}" for name in options("debug")],
)
def test_every_config_option_composes_with_importable_targets(override):
    extra = ["model.name=resnet18"] if override in ("model=torchvision", "model=timm") else []
    extra += ["data.root=/tmp/images"] if "imagefolder" in override or "resnet50_finetune" in override else []
    cfg = compose_train(override, *extra)
    names = targets(OmegaConf.to_container(cfg, resolve=False))
    assert names
    for target in names:
        assert get_object(target) is not None, target


@pytest.mark.filterwarnings("ignore:You passed `Trainer\\(accelerator='cpu', precision='16-mixed'\\)`")
@pytest.mark.parametrize("precision", ["32", "16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp"])
def test_trainer_configs_build_with_each_precision(trainer, precision, tmp_path):
    cfg = compose_train(f"trainer={trainer}", f"trainer.precision={precision}", "trainer.accelerator=cpu")
    cfg.trainer.default_root_dir = str(tmp_path)
    built = instantiate(cfg.trainer, logger=False)
    # fp16 autocast is GPU-only: on a CPU, Lightning runs 16-mixed as bf16-mixed (with a warning).
    expected = {"32": "32-true", "16-mixed": "bf16-mixed", "bf16-mixed": "bf16-mixed"}[precision]
    assert built.precision == expected
    if trainer == "ddp":
        assert type(built.strategy).__name__ == "DDPStrategy" and built.num_devices == 2


def test_strategy_settings_match_the_documented_defaults():
    fe, ft = compose_train("strategy=feature_extract").strategy, compose_train("strategy=finetune").strategy
    assert fe.head_lr == pytest.approx(1e-2)
    assert (ft.head_lr, ft.backbone_lr) == (pytest.approx(1e-3), pytest.approx(1e-4))
    assert ft.backbone_lr < ft.head_lr
