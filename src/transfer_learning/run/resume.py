"""`ckpt_path=last` and resuming a run as it was started, in its own folder.

:func:`restore_settings` runs before Hydra composes anything: a command that resumes from a
checkpoint of an earlier run (``ckpt_path=last``: the newest ``checkpoints/last.ckpt`` under
``logs/<task>/runs``; or any ``.../<run>/checkpoints/<file>.ckpt``) gets that run's own
command-line settings back (:data:`RUN_SETTINGS`), except those given again, so that
``python train.py ckpt_path=last`` continues a ``strategy=finetune trainer.max_epochs=3`` run as
such. The settings are read as data: a saved setting that names code (``_target_``) or Hydra's
own keys is left out (with a warning), never composed.

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
from omegaconf import DictConfig, open_dict, read_write

from transfer_learning.run.config import compose_plain, expand_path

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
    saved = _saved_settings(folder) if folder is not None else []
    restored = [
        o for o in saved
        if setting_key(o) != "ckpt_path"
        and not any(setting_key(o) == g or setting_key(o).startswith(g + ".") for g in given)
    ]  # fmt: skip
    if os.environ.get("LOCAL_RANK", "0") == "0" and folder is not None:
        settings = f" with the settings it was started with: {' '.join(restored)}" if restored else ""
        print(f"Resuming {folder} from {checkpoint.name}{settings}", file=sys.stderr)
    return [argv[0], *restored, *args]


def _saved_settings(folder: Path) -> list[str]:
    """The settings a run trains with (:data:`RUN_SETTINGS`), read as data."""
    path = folder / RUN_SETTINGS if (folder / RUN_SETTINGS).is_file() else folder / HYDRA_OVERRIDES
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        _fail(f"cannot read {path} ({exc}): give the run's settings on the command line with ckpt_path.")
    if saved is None:
        return []
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        _fail(
            f"{path} is not a list of settings: give the run's settings on the command line with ckpt_path."
        )
    code = [setting_key(o) for o in saved if _CODE_KEY.search(setting_key(o))]
    # The whole node of a `_target_` is left out (`+callbacks.probe.*`), not only that key.
    nodes = [re.split(r"[./@]_[a-z]+_", key)[0] for key in code]
    kept = [
        o for o in saved if not any(setting_key(o) == n or setting_key(o).startswith(n + ".") for n in nodes)
    ]
    if code and os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"Warning: not restoring {', '.join(sorted(set(nodes)))} from {path}: a saved setting that "
            "names code is never run from a file. Give it on the command line again if the run needs it.",
            file=sys.stderr,
        )
    return kept


def latest_checkpoint(runs: Path) -> Path | None:
    found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/<file>``), if it is one."""
    folder = checkpoint.absolute().parent.parent
    return folder if checkpoint.parent.name == "checkpoints" and (folder / ".hydra").is_dir() else None


def wandb_run_id(folder: Path) -> str | None:
    """The id of the newest W&B run kept in a run folder (``wandb/[offline-]run-<date>-<id>``)."""
    runs = sorted((folder / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


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
