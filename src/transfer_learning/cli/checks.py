"""Mistakes on the command line, found before Hydra makes a run folder or anything is imported
for training: a setting that does not exist (with the closest one), a value of the wrong type
(``strategy.head_lr=abc``), a required setting left out, a launcher that cannot work here.

Each check returns one message with the fix, or None; :func:`check_command` runs them. Anything
these checks cannot judge is left to Hydra and to the run's own checks.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from transfer_learning.run.config import CONF_DIR, compose_plain

# Flags that print something and run nothing (help, the composed config).
HELP_FLAGS = {
    "-h",
    "--help",
    "--hydra-help",
    "--version",
    "-sc",
    "--shell-completion",
    "-i",
    "--info",
    "-c",
    "--cfg",
}
# Another config than conf/<name>.yaml: these checks would judge the wrong one.
CONFIG_FLAGS = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir"}
MULTIRUN_FLAGS = {"-m", "--multirun"}


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_group(key: str) -> bool:
    return "/" in key or (CONF_DIR / key).is_dir()


def _keys(node: Any) -> list[str]:
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def _closest(leaf: str, keys: list[str], cutoff: float) -> str | None:
    found = difflib.get_close_matches(leaf, keys, n=1, cutoff=cutoff)
    return found[0] if found else None


def _unknown_key(config_name: str, overrides: list[str], key: str, value: str) -> str:
    parent, _, leaf = key.rpartition(".")
    others = [o for o in overrides if _key(o) != key]
    try:
        node = compose_plain(config_name, others)
        node = OmegaConf.select(node, parent) if parent else node
    except Exception:
        node = None
    keys = [k for k in _keys(node) if not k.startswith("_")]
    where = f"{parent}." if parent else ""
    close = _closest(leaf, keys, 0.6)
    if close is not None:
        hint = f"did you mean {where}{close}={value}?"
    elif keys:
        hint = f"{parent or 'the config'} has: {', '.join(sorted(keys))}"
    else:
        hint = f"{parent} is not a group of settings" if parent else "see --help"
    return f"{key} is not a setting ({hint})."


def _new_key_like_an_old_one(cfg: DictConfig, key: str, value: str) -> str | None:
    """``+trainer.max_epoch=3``: a new argument for an object whose existing one is meant."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else None
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    close = _closest(leaf, [k for k in _keys(node) if k != leaf and not k.startswith("_")], 0.8)
    if close is None:
        return None
    return (
        f"+{key}={value} adds a new argument '{leaf}' to {node._target_} next to its '{close}': did you "
        f"mean {parent}.{close}={value}? (To add it anyway: ++{key}={value}.)"
    )


def _wrong_type(default: Any, value: Any, key: str, given: str) -> str | None:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        wanted = "true or false"
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        wanted = "a number"
    else:
        return None
    if ok or value is None:
        return None
    return f"{key}={given} is not {wanted} (its default is {default}): write e.g. {key}={default}."


def _exists(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` is a setting of ``cfg`` (its value may be ``???``); an index into a list is
    left to Hydra (True)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
    # Not ``leaf in node``: OmegaConf says False for a key whose value is ``???``.
    return isinstance(node, ListConfig) or (isinstance(node, DictConfig) and leaf in list(node))


def _composition_problem(config_name: str, overrides: list[str], text: str) -> str | None:
    """Hydra's composition error ``text`` as a message with the fix; None to leave Hydra's own."""
    for override in overrides:
        key, value = _key(override), override.partition("=")[2]
        if f"Could not override '{key}'" in text:
            return _unknown_key(config_name, overrides, key, value)
    missing = re.search(r"Could not find '([\w/]+)/([^'/]+)'", text)
    if missing and (CONF_DIR / missing[1]).is_dir():
        group, option = missing[1], missing[2]
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        close = _closest(option, options, 0.6)
        hint = f"did you mean {group}={close}? " if close else ""
        return f"{group}={option} is not an option of {group} ({hint}options: {', '.join(options)})."
    return None


def check_settings(config_name: str, overrides: list[str]) -> str | None:
    """Unknown keys (with the closest existing one) and values of the wrong type.

    One composition, of the config groups chosen (Hydra composes the whole command itself right
    after): each ``key=value`` is then judged against the defaults it replaces, its value parsed
    by Hydra's own override grammar, so it is what Hydra would set."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException

    groups = [o for o in overrides if _is_group(_key(o))]
    try:
        defaults = compose_plain(config_name, groups)
    except ConfigCompositionException as exc:
        return _composition_problem(config_name, overrides, str(exc))
    except Exception:
        return None
    parser = OverridesParser.create()
    added = {_key(o) for o in overrides if o.startswith("+")}
    given: set[str] = set()
    for override in overrides:
        if override in groups or _key(override).startswith("hydra"):
            continue
        try:
            parsed = parser.parse_override(override)
        except Exception:
            return None  # Hydra says what is wrong with it
        if parsed.is_sweep_override() or parsed.is_delete():
            continue
        name, text, value = parsed.key_or_group, override.partition("=")[2], parsed.value()
        given.add(name)
        if parsed.is_force_add():
            continue
        if parsed.is_add():
            problem = _new_key_like_an_old_one(defaults, name, text)
        elif not _exists(defaults, name) and name not in added:
            problem = _unknown_key(config_name, overrides, name, text)
        elif isinstance(value, str) and "${" in value:
            problem = None  # an interpolation: its type is known once Hydra resolves it
        else:
            default = OmegaConf.select(defaults, name, throw_on_missing=False)
            problem = _wrong_type(default, value, name, text)
        if problem:
            return problem
    if config_name == "eval" and "ckpt_path" not in given and OmegaConf.is_missing(defaults, "ckpt_path"):
        return "ckpt_path is required: python eval.py ckpt_path=logs/train/runs/<run>/checkpoints/<file>.ckpt"
    return None


def check_launcher(args: Sequence[str]) -> str | None:
    """``hydra/launcher=submitit_slurm`` where SLURM is not installed."""
    launchers = [a.partition("=")[2] for a in args if _key(a) == "hydra/launcher"]
    if launchers and launchers[-1] == "submitit_slurm" and shutil.which("sbatch") is None:
        return (
            "hydra/launcher=submitit_slurm submits each job with SLURM's sbatch, which is not on this "
            "machine's PATH: run the command on a SLURM login node, or use hydra/launcher=submitit_local "
            "to run the jobs here."
        )
    return None


def check_command(config_name: str, argv: Sequence[str]) -> str | None:
    """The first mistake in ``argv`` (``sys.argv`` of train or eval) these checks find, or None.
    Help, and the per-job values of a multirun, are left to Hydra."""
    args = list(argv[1:])
    flags = {a.split("=", 1)[0] for a in args if a.startswith("-")}
    if (HELP_FLAGS | CONFIG_FLAGS) & flags or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    if MULTIRUN_FLAGS & set(args):  # a launcher is used by multiruns only
        return check_launcher(args)
    if any(_key(a) == "hydra.searchpath" for a in args if not a.startswith("-")):
        return None  # configs from other folders: only Hydra knows their options and keys
    overrides = [a for a in args if not a.startswith("-") and "=" in a and not _key(a).startswith("hydra")]
    return check_settings(config_name, overrides)
