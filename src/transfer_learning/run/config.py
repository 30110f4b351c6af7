"""From the YAML in ``conf/`` to objects: composing, expanding paths, and the one build path.

:func:`build` is the only place that turns a composed config into ``(datamodule, module)``;
``train.py``, the tests and the scripts all go through it.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from transfer_learning.errors import ConfigError

if TYPE_CHECKING:  # torch and Lightning load when something is built, not for `train.py --help`
    from transfer_learning.data.datamodule import ImageDataModule
    from transfer_learning.data.feature_cache import FeatureCache
    from transfer_learning.model.module import TransferLearningModule

# The repository's conf/ (the package is installed in editable mode from src/).
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
# Config keys whose values are file or folder paths: `~` and `$VARS` are expanded in them.
PATH_KEY = re.compile(r"(^|_)(root|dir|dirpath|path|weights|file)$")
_OVERRIDE = re.compile(r"^(?P<key>[+~]{0,2}[\w.@/-]+)=(?P<value>.*)$", re.DOTALL)


def expand_path(value: str) -> str:
    """``~`` and environment variables expanded; ``${...}`` interpolations are left alone."""
    return os.path.expanduser(os.path.expandvars(value)) if "~" in value[:1] or "$" in value else value


def expand_paths(node: Any, key: str = "") -> Any:
    """A plain config tree with every path value (by key name, see PATH_KEY) expanded."""
    if isinstance(node, dict):
        return {k: expand_paths(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_paths(v, key) for v in node]
    if isinstance(node, str) and PATH_KEY.search(key):
        return expand_path(node)
    return node


def expand_overrides(argv: Iterable[str]) -> list[str]:
    """Command-line overrides with ``~`` and ``$VARS`` expanded in their values.

    Hydra's override grammar rejects a bare ``~`` (``data.root=~/data``) and letters beyond
    ASCII (``data.root=$HOME/ünïcødé``) with a lexer traceback: such a value is quoted for it.
    Quoted values (``'data.root="$HOME/data"'``) reach Hydra unexpanded.
    """
    out = []
    for arg in argv:
        match = None if arg.startswith("-") else _OVERRIDE.match(arg)
        if match is None:
            out.append(arg)
            continue
        value = match["value"]
        quote = value[0] if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0] else ""
        inner = value[1:-1] if quote else value
        expanded = expand_path(inner)
        if not quote and _needs_quotes(expanded):
            quote = "'" if '"' in expanded else '"'
        out.append(f"{match['key']}={quote}{expanded}{quote}")
    return out


def _needs_quotes(value: str) -> bool:
    """A plain value Hydra's grammar cannot read unquoted: letters beyond ASCII (``ünïcødé 鳥``)
    in a value that is not a list, a dict, a sweep or already quoted."""
    plain = not any(c in value for c in "'\",[]{}()$")
    return plain and not value.isascii()


def check_writable(folder: Path, setting: str) -> None:
    """Fail before training, not after the first epoch, when outputs cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to {folder} ({setting}): {exc.strerror or exc}. Point {setting} at a "
            "writable folder, or fix its permissions."
        ) from exc


def compose_plain(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides`` as Hydra composes it, without a run folder or
    the ``hydra`` node: for what is looked up before Hydra starts (checks, the runs folder)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def compose_config(
    overrides: Sequence[str] = (), output_dir: str | Path | None = None, config_dir: Path = CONF_DIR
) -> DictConfig:
    """The config ``python train.py <overrides>`` would run with, composed from the real YAML.

    ``output_dir`` stands in for the run folder Hydra would make, so ``${hydra:...}``
    interpolations resolve (paths.output_dir) and the config can be passed to ``train()``.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or Path.cwd() / "outputs")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def feature_cache(
    cfg: DictConfig, module: TransferLearningModule, datamodule: ImageDataModule, bf16: bool | None
) -> FeatureCache:
    """The feature cache of ``cfg``'s backbone (``paths.feature_cache_dir``): files are keyed by
    the weights, the preprocessing, the images and the precision, so caches of runs with the same
    key are shared."""
    from transfer_learning.data.feature_cache import FeatureCache

    return FeatureCache(
        directory=expand_path(str(cfg.paths.feature_cache_dir)),
        backbone=module.net.backbone,
        identity={"model": module.hparams["model"], "preprocessing": module.preprocessing.to_dict()},
        bf16=bf16,
        batch_size=max(datamodule.batch_size, 64),
        num_workers=datamodule.num_workers,
    )


def build(cfg: DictConfig) -> tuple[ImageDataModule, TransferLearningModule]:
    """The data module and the LightningModule of ``cfg``, introduced to each other in one
    direction: the source gives the class names and the task, which size the network; the
    network gives the loaders its preprocessing; the strategy's hooks say which features it
    needs (cached features to train on, features for its step before fit) and whether the
    training loss takes the data's loss weights."""
    from transfer_learning.model.module import TransferLearningModule

    missing = sorted(key.split(".")[-1] for key in OmegaConf.missing_keys(cfg.data))
    if missing:
        examples = {
            "root": "data.root=$HOME/data/birds (class folders)",
            "file": "data.file=labels.csv (a CSV)",
        }
        raise ConfigError(
            f"data.{missing[0]} is not set: add {examples.get(missing[0], f'data.{missing[0]}=...')} "
            "to the command line, or use data=demo."
        )
    data = expand_paths(OmegaConf.to_container(cfg.data, resolve=True))
    datamodule: ImageDataModule = instantiate(data, task=cfg.get("task"))
    class_names = datamodule.discover()
    size = cfg.get("input") or {}
    module = TransferLearningModule(
        model=expand_paths(OmegaConf.to_container(cfg.model, resolve=True)),
        strategy=cfg.strategy,
        class_names=class_names,
        optimizer=cfg.optimizer,
        scheduler=cfg.get("scheduler"),
        image_size=size.get("image_size"),
        image_size_strict=size.get("image_size_strict", True),
        label_smoothing=cfg.get("label_smoothing", 0.0),
        channels_last=cfg.get("channels_last", True),
        task=datamodule.task,
    )
    datamodule.set_preprocessing(module.preprocessing)
    strategy = module.strategy
    if strategy.uses_loss_weights:
        module.use_loss_weights(datamodule.loss_weights())
    wanted = strategy.training_features()
    if wanted is not None:
        if not module.net.backbone_frozen:
            raise ConfigError(
                f"strategy={strategy.name} asks to train on cached features, but its backbone is not "
                "frozen: cached features hold a backbone that does not change. Freeze the backbone in "
                "its prepare(), or return None from training_features()."
            )
        cache = feature_cache(cfg, module, datamodule, wanted.bf16)
        datamodule.use_feature_cache(
            cache, views=wanted.views, seed=cfg.get("seed") or 0, batch_size=wanted.batch_size
        )
    before = strategy.features_before_fit()
    if before is not None:
        probe_cache = feature_cache(cfg, module, datamodule, before.bf16)
        module.use_features_before_fit(
            functools.partial(datamodule.cached_features, probe_cache, before.splits)
        )
    if cfg.get("compile"):
        module.net.backbone.compile()  # in place: checkpoint keys stay the same
    return datamodule, module
