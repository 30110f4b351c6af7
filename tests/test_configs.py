"""Every option of every config group composes, and its objects can be built."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from transfer_learning.run.config import CONF_DIR, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_train(*overrides: str):
    return compose_config(overrides)


def targets(node) -> list[str]:
    """Every ``_target_`` in a plain (unresolved) config tree."""
    if isinstance(node, dict):
        own = [node["_target_"]] if node.get("_target_") else []
        return own + [t for value in node.values() for t in targets(value)]
    if isinstance(node, list):
        return [t for item in node for t in targets(item)]
    return []


def test_default_config_is_the_offline_path():
    cfg = compose_train()
    assert cfg.model._target_ == "transfer_learning.model.backbones.efficientnet_lite0"
    assert cfg.model.weights == "bundled"
    assert cfg.strategy._target_ == "transfer_learning.model.strategies.FeatureExtraction"
    assert cfg.data.generate is not None and set(cfg.logger) == {"csv", "wandb"}


@pytest.mark.parametrize(
    "override",
    [
        f"{group}={name}"
        for group in ("model", "strategy", "scheduler", "data", "trainer", "logger", "callbacks")
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
@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp_cpu"])
def test_trainer_configs_build_with_each_precision(trainer, precision, tmp_path):
    cfg = compose_train(f"trainer={trainer}", f"trainer.precision={precision}", "trainer.accelerator=cpu")
    cfg.trainer.default_root_dir = str(tmp_path)
    built = instantiate(cfg.trainer, logger=False)
    # fp16 autocast is GPU-only: on a CPU, Lightning runs 16-mixed as bf16-mixed (with a warning).
    expected = {"32": "32-true", "16-mixed": "bf16-mixed", "bf16-mixed": "bf16-mixed"}[precision]
    assert built.precision == expected
    if trainer == "ddp_cpu":
        assert type(built.strategy).__name__ == "DDPStrategy" and built.num_devices == 2


def test_cluster_trainers_say_what_they_run_on():
    ddp, multinode = compose_train("trainer=ddp").trainer, compose_train("trainer=multinode").trainer
    assert (ddp.strategy, ddp.accelerator, ddp.devices, ddp.num_nodes) == ("ddp", "gpu", "auto", 1)
    assert (multinode.strategy, multinode.accelerator, multinode.num_nodes) == ("ddp", "gpu", 2)
    ddp_cpu = compose_train("trainer=ddp_cpu").trainer
    assert (ddp_cpu.strategy, ddp_cpu.accelerator, ddp_cpu.devices) == ("ddp", "cpu", 2)


@pytest.mark.parametrize("launcher", ["submitit_local", "submitit_slurm"])
def test_launcher_configs_set_every_field_of_the_submitit_plugin(launcher):
    """conf/hydra/launcher/<name>.yaml replaces the plugin's config of the same name: it must set
    every field the plugin defines (a plugin upgrade that adds one fails here) and no other."""
    import dataclasses

    from hydra_plugins.hydra_submitit_launcher import config as plugin

    schema = plugin.LocalQueueConf if launcher == "submitit_local" else plugin.SlurmQueueConf
    ours = OmegaConf.load(CONF_DIR / "hydra" / "launcher" / f"{launcher}.yaml")
    assert set(ours) == {field.name for field in dataclasses.fields(schema)}
    assert ours._target_ == schema._target_


@pytest.mark.parametrize("strategy", ["feature_extract", "finetune"])
def test_the_optuna_search_space_applies_to_both_strategies(strategy):
    """Every searched parameter is a valid override with either strategy, and builds."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        search = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True).hydra.sweeper
    assert search.sampler.seed is not None and search.direction == "maximize"
    trial = [f"{key}=0.001" for key in search.params if key != "strategy"]
    cfg = compose_train("hparams_search=optuna", f"strategy={strategy}", *trial)
    built = instantiate(cfg.strategy)
    assert built.name == strategy and built.head_lr == pytest.approx(0.001)
    assert cfg.optimizer.weight_decay == pytest.approx(0.001) and cfg.label_smoothing == pytest.approx(0.001)
    if strategy == "finetune":
        assert built.backbone_lr == pytest.approx(0.001)


# -- paths: `~` and environment variables --------------------------------------------------------


def test_bare_tilde_and_variables_in_command_line_overrides_are_expanded(monkeypatch):
    from transfer_learning.run.config import expand_overrides

    monkeypatch.setenv("HOME", "/home/ada")
    monkeypatch.setenv("DATA", "/srv/images")
    assert expand_overrides(
        [
            "train.py",
            "data.root=~/data/birds",
            'data.root="~/x"',  # typed as 'data.root="~/x"' in bash
            "model.weights='$DATA/w.pth'",
            "paths.log_dir=${oc.env:HOME}/logs",
            "strategy.head_lr=1e-3",
            "-m",
        ]
    ) == [
        "train.py",
        "data.root=/home/ada/data/birds",
        'data.root="/home/ada/x"',
        "model.weights='/srv/images/w.pth'",
        "paths.log_dir=${oc.env:HOME}/logs",  # Hydra's own interpolation is left to Hydra
        "strategy.head_lr=1e-3",
        "-m",
    ]


def test_path_values_written_in_yaml_or_quoted_are_expanded_when_built(monkeypatch, tmp_path, shapes_dir):
    import shutil

    from transfer_learning.run.config import build

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WEIGHTS_DIR", str(tmp_path / "weights"))
    shutil.copytree(shapes_dir, tmp_path / "birds")
    (tmp_path / "weights").mkdir()
    from transfer_learning.model.backbones import efficientnet_lite0

    torch.save(efficientnet_lite0(2).backbone.state_dict(), tmp_path / "weights" / "lite0.pth")
    cfg = compose_config(
        [
            "data=imagefolder",
            'data.root="~/birds"',
            "input.image_size=32",
            'model.weights="$WEIGHTS_DIR/lite0.pth"',
        ]
    )
    datamodule, module = build(cfg)
    assert datamodule.source.root == tmp_path / "birds"
    assert module.hparams["model"]["weights"] == str(tmp_path / "weights" / "lite0.pth")
    assert module.net.pretrained
