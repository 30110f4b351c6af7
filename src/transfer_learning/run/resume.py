"""`ckpt_path=last` and resuming a run as it was started, in its own folder.

:func:`restore_settings` runs before Hydra composes anything: a command that resumes from a
checkpoint of an earlier run (``ckpt_path=last``: the newest ``checkpoints/last.ckpt`` under
``logs/<task>/runs``; or any ``.../<run>/checkpoints/<file>.ckpt``) gets that run's own
command-line settings back (:data:`RUN_SETTINGS`), except those given again, so that
``python train.py ckpt_path=last`` continues a ``strategy=finetune trainer.max_epochs=3`` run as
such. The settings are read as data (:func:`transfer_learning.readers.read_string_list`) and
restored from an allow-list (:func:`restorable`): only ``key=value`` where the key is a config
group and the value one of its options in ``conf/``, or the key a setting the composed config
has and the value a plain scalar or a list of them. Anything else (a ``+`` addition, a ``~``
deletion, a dict holding ``_target_``, an interpolation or resolver, a sweep, Hydra's own keys,
a setting that moves where files are written) is left out with one warning naming it and the
file. Settings typed on the command line are the user's own and stay as they are.

Then, before Hydra makes a new run folder, :class:`ResumeRun` points the run back at that run's
folder: one CSV history (continued, see :class:`transfer_learning.run.loggers.CSVLogger`), one
train.log, and the same W&B run id.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from transfer_learning.readers import UntrustedFileError, read_string_list
from transfer_learning.run.config import CONF_DIR, compose_plain, expand_path

# The command-line settings a run trains with, kept by train() once the run has started (or a
# resume of it has passed its checks). Hydra's own .hydra/overrides.yaml is rewritten by every
# command pointed at the folder, a failed one too: it is read only for runs without this file.
RUN_SETTINGS = Path(".hydra") / "run_overrides.yaml"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
# A key that names code to instantiate (`_target_`, `_args_`, ...) or one of Hydra's own settings.
_CODE_KEY = re.compile(r"(^|[./@])_[a-z]+_($|[./@])|^hydra([./]|$)")
MULTIRUN_FLAGS = {"-m", "--multirun"}


def setting_key(override: str) -> str:
    """``strategy.head_lr`` of ``+strategy.head_lr=0.1``, ``~strategy.head_lr``, ``strategy.head_lr=0.1``."""
    return override.split("=", 1)[0].lstrip("+~")


def _unquoted(value: str) -> str:
    return value[1:-1] if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0] else value


def _fail(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _runs_folder(overrides: list[str]) -> Path:
    """``<paths.log_dir>/<task_name>/runs`` as ``overrides`` compose it."""
    try:
        cfg = compose_plain("train", overrides)
        log_dir, task = str(cfg.paths.log_dir), str(cfg.task_name)
    except Exception:  # a mistake in the overrides: Hydra says what it is when it composes them
        log_dir = str(Path(os.environ.get("PROJECT_ROOT", ".")) / "logs")
        task = "train"
    return Path(expand_path(log_dir)) / task / "runs"


def restore_settings(argv: Sequence[str]) -> list[str]:
    """``argv`` (``sys.argv`` of ``train.py``) with ``ckpt_path`` made absolute (``last``
    resolved) and, when the checkpoint is in a run folder, that run's saved settings put back in
    front of the ones given now. Settings given now win: a saved ``strategy.head_lr=...`` is left
    out when ``strategy=...`` or ``strategy.head_lr=...`` is given. Exits with one message when
    there is nothing to resume. A multirun (``-m``) is left as it is."""
    args = list(argv[1:])
    at = [
        i for i, a in enumerate(args) if not a.startswith("-") and setting_key(a) == "ckpt_path" and "=" in a
    ]
    if not at or MULTIRUN_FLAGS & set(args):
        return list(argv)
    requested = _unquoted(args[at[-1]].split("=", 1)[1])
    if requested in ("", "null"):
        return list(argv)
    overrides = [a for a in args if not a.startswith("-") and "=" in a and setting_key(a) != "ckpt_path"]
    given = {setting_key(a) for a in overrides} | {setting_key(a) for a in args if a.startswith("~")}
    if requested == "last":
        explicit = [_unquoted(a.split("=", 1)[1]) for a in overrides if setting_key(a) == "hydra.run.dir"]
        own = Path(explicit[-1]) / "checkpoints" / "last.ckpt" if explicit else None
        runs = _runs_folder([a for a in overrides if not setting_key(a).startswith("hydra.")])
        checkpoint = own if own is not None and own.is_file() else latest_checkpoint(runs)
        if checkpoint is None:
            _fail(
                f"ckpt_path=last, but no run under {runs} has a checkpoints/last.ckpt. Train first, "
                "or give the checkpoint's path (ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt)."
            )
    else:
        checkpoint = Path(expand_path(requested))
        if checkpoint.is_dir():
            found = sorted(p.name for p in checkpoint.glob("checkpoints/*.ckpt")) or sorted(
                p.name for p in checkpoint.glob("*.ckpt")
            )
            hint = f" (it holds {', '.join(found[:4])})" if found else ""
            _fail(
                f"ckpt_path={requested} is a folder{hint}: give a checkpoint file, "
                "e.g. .../checkpoints/last.ckpt."
            )
        if not checkpoint.is_file():
            _fail(
                f"ckpt_path={requested}: no such file. Give a checkpoint file "
                "(logs/train/runs/<run>/checkpoints/last.ckpt), or ckpt_path=last for the newest run."
            )
    assert checkpoint is not None
    checkpoint = checkpoint.absolute()
    args[at[-1]] = f"ckpt_path={checkpoint}"
    for i in reversed(at[:-1]):
        del args[i]
    folder = run_folder_of(checkpoint)
    restored = _saved_settings(folder, overrides, given) if folder is not None else []
    if os.environ.get("LOCAL_RANK", "0") == "0" and folder is not None:
        settings = f" with the settings it was started with: {' '.join(restored)}" if restored else ""
        print(f"Resuming {folder} from {checkpoint.name}{settings}", file=sys.stderr)
    return [argv[0], *restored, *args]


def _saved_settings(folder: Path, now: Sequence[str], given: set[str]) -> list[str]:
    """The settings a run trains with (:data:`RUN_SETTINGS`), read as data, less ``ckpt_path``
    and those ``given`` again now, and kept only where :func:`restorable` allows them; ``now``:
    this command line's settings (they decide which config groups, so which keys, compose)."""
    path = folder / RUN_SETTINGS if (folder / RUN_SETTINGS).is_file() else folder / HYDRA_OVERRIDES
    if not path.is_file():
        return []
    fix = "Give the run's settings on the command line with ckpt_path (or delete the file)."
    try:
        saved = read_string_list(path, fix=fix)
    except UntrustedFileError as exc:
        _fail(str(exc))
    wanted = [
        o for o in saved
        if setting_key(o) != "ckpt_path"
        and not any(setting_key(o) == g or setting_key(o).startswith(g + ".") for g in given)
    ]  # fmt: skip
    kept, refused = restorable(wanted, now)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for setting, reason in refused:
            print(
                f"Warning: not restoring {setting[:200]!r} from {path}: {reason}. Saved settings come back "
                "only as plain values of settings the config has; give it on the command line if the run "
                "needs it.",
                file=sys.stderr,
            )
    return kept


def restorable(saved: Sequence[str], now: Sequence[str] = ()) -> tuple[list[str], list[tuple[str, str]]]:
    """The saved settings that may come back, and the others with why not. A setting comes back
    only as ``key=value`` (no ``+`` addition, ``~`` deletion or ``@package``) where ``key`` is a
    config group and ``value`` one of its options under ``conf/``, or ``key`` is a setting the
    composed config has (not Hydra's own, not where files are written) and ``value`` a plain
    scalar or a list of plain scalars: no dict (no ``_target_``), no interpolation or resolver
    (``${...}``), no sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    options = config_groups()
    parsed: list[tuple[str, Any]] = []
    refused: list[tuple[str, str]] = []
    for setting in saved:
        try:
            override = parser.parse_override(setting)
        except (HydraException, ValueError) as exc:
            refused.append((setting, f"Hydra cannot read it ({' '.join(str(exc).split())[:120]})"))
            continue
        key, reason = override.key_or_group, None
        if override.type != OverrideType.CHANGE:
            reason = "it adds or deletes a setting (+ or ~)"
        elif override.package is not None:
            reason = "it moves a config to another package (@)"
        elif _CODE_KEY.search(key) or key == "hydra" or key.startswith("hydra/"):
            reason = "it is one of Hydra's own settings or names code"
        elif override.is_sweep_override():
            reason = "it is a sweep, not a value"
        elif key.split(".")[-1] in WRITE_KEYS:
            reason = "it says where files are written"
        else:
            reason = _plain_reason(override.value())
        if reason is None and key in options and override.value() not in options[key]:
            reason = f"{override.value()!r} is not one of the {key} configs in conf/{key}/"
        if reason is None:
            parsed.append((setting, override))
        else:
            refused.append((setting, reason))
    chosen = {o.key_or_group: s for s, o in parsed if o.key_or_group in options}  # the last one wins
    chosen.update({setting_key(o): o for o in now if setting_key(o) in options})
    keys = known_keys(list(chosen.values()))
    kept = []
    for setting, override in parsed:
        key = override.key_or_group
        if key in options or key in keys:
            kept.append(setting)
        else:
            refused.append((setting, f"the config has no setting {key}"))
    order = {id(setting): i for i, setting in enumerate(saved)}
    return kept, sorted(refused, key=lambda item: order[id(item[0])])


# The last part of a key that says where a run writes its checkpoints and logs: a file that moves
# them is refused (the run folder itself is the checkpoint's). paths.root_dir and the caches'
# folders come back: a run started elsewhere finds its data and feature cache again.
WRITE_KEYS = {"dirpath", "save_dir", "output_dir", "log_dir", "filename"}


def _plain_reason(value: Any) -> str | None:
    """Why ``value`` is not a plain scalar or a list of them; None when it is."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, dict | list):
            return "its value is a mapping or a nested list, not a plain value"
        if not (item is None or isinstance(item, bool | int | float | str)):
            return f"its value is a {type(item).__name__}, not a plain value"
        if isinstance(item, str) and "${" in item:
            return "its value is an interpolation (${...}), which OmegaConf would resolve"
    return None


def config_groups() -> dict[str, set[str]]:
    """Each config group of ``conf/`` (Hydra's own left out) and its options."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        choices = compose("train", return_hydra_config=True).hydra.runtime.choices
        loader = GlobalHydra.instance().config_loader()
        return {
            str(group): set(loader.get_group_options(str(group)))
            for group in choices
            if not str(group).startswith("hydra")
        }


def known_keys(groups: Sequence[str]) -> set[str]:
    """Every dotted key of the config ``groups`` compose (``conf/`` when they cannot)."""
    try:
        cfg = compose_plain("train", list(groups))
    except Exception:  # a group given now that does not compose: Hydra says so when the run starts
        cfg = compose_plain("train")
    found: set[str] = set()
    # Plain values, unresolved: interpolations (${hydra:...} among them) and ??? stay as written.
    stack: list[tuple[str, Any]] = [("", OmegaConf.to_container(cfg, resolve=False))]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, dict):
            for k, value in node.items():
                key = f"{prefix}{k!s}"
                found.add(key)
                stack.append((key + ".", value))
    return found


def latest_checkpoint(runs: Path) -> Path | None:
    """The newest ``last.ckpt`` of a run, or of a fold of a cv=K run (``<run>/folds/fold<k>/``, or
    its refit's ``<run>/folds/refit/``)."""
    found = [*runs.glob("*/checkpoints/last.ckpt"), *runs.glob("*/folds/*/checkpoints/last.ckpt")]
    found.sort(key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def fold_of_checkpoint(checkpoint: Path) -> tuple[Path, int] | None:
    """``(<run>, k)`` for a checkpoint in a cv=K run's ``<run>/folds/fold<k>/checkpoints/`` (k = -1
    for the refit's ``<run>/folds/refit/checkpoints/``)."""
    folder = checkpoint.absolute().parent.parent
    match = re.fullmatch(r"fold(\d{1,2})|refit", folder.name)
    if checkpoint.parent.name != "checkpoints" or folder.parent.name != "folds" or not match:
        return None
    return folder.parent.parent, int(match[1]) if match[1] is not None else -1


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/<file>``, or a cv=K run's
    ``<run>/folds/fold<k>/checkpoints/<file>``), if it is one."""
    fold = fold_of_checkpoint(checkpoint)
    folder = fold[0] if fold is not None else checkpoint.absolute().parent.parent
    return folder if checkpoint.parent.name == "checkpoints" and (folder / ".hydra").is_dir() else None


def wandb_run_id(folder: Path) -> str | None:
    """The id of the newest W&B run kept in a run folder (``wandb/[offline-]run-<date>-<id>``);
    None when there is none or the name holds anything but a W&B id's letters and digits."""
    runs = sorted((folder / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    run_id = runs[-1].name.rsplit("-", 1)[-1] if runs else None
    return run_id if run_id and re.fullmatch(r"[a-z0-9]{1,64}", run_id) else None  # a folder name is data


class ResumeRun(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        requested = config.get("ckpt_path")
        if not requested or not config.get("run_folder_from_checkpoint", True):
            return  # eval.py reads checkpoints; it never writes into their runs
        explicit_dir = any(
            o.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for o in config.hydra.overrides.hydra
        )
        if str(requested) == "last":
            own = Path(str(config.hydra.run.dir)) / "checkpoints" / "last.ckpt"
            runs = Path(expand_path(str(config.paths.log_dir))) / str(config.task_name) / "runs"
            checkpoint = own if explicit_dir and own.is_file() else latest_checkpoint(runs)
            if checkpoint is None:
                print(
                    f"Error: ckpt_path=last, but no run under {runs} has a checkpoints/last.ckpt. "
                    "Train first, or give the checkpoint's path.",
                    file=sys.stderr,
                )
                sys.exit(2)
        else:
            checkpoint = Path(expand_path(str(requested)))
        checkpoint = checkpoint.absolute()
        folder = run_folder_of(checkpoint) if checkpoint.is_file() else None
        with read_write(config), open_dict(config):
            config.ckpt_path = str(checkpoint)
            if folder is None or os.environ.get("LOCAL_RANK", "0") != "0":
                return  # a checkpoint from elsewhere trains into a new folder; DDP workers are told theirs
            if not explicit_dir:
                config.hydra.run.dir = str(folder)
            wandb = config.get("logger", {}).get("wandb") if config.get("logger") else None
            run_id = wandb_run_id(folder)
            if wandb is not None and run_id and not wandb.get("id"):
                wandb.id = run_id
                wandb.resume = "allow"


def save_run_settings(folder: Path, overrides: Sequence[str]) -> None:
    """Keep the command-line settings this run trains with (``ckpt_path`` left out) for
    :func:`restore_settings`."""
    kept = [str(o) for o in overrides if setting_key(str(o)) != "ckpt_path"]
    path = folder / RUN_SETTINGS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(kept, allow_unicode=True), encoding="utf-8")
