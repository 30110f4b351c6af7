"""Starting a Hydra command (``train``, ``eval``) the same way from ``python train.py``,
``python eval.py`` and the installed ``tl-train`` / ``tl-eval``, whatever the working folder."""

from __future__ import annotations

import os
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence

import hydra
from omegaconf import DictConfig

from transfer_learning.run.config import CONF_DIR, expand_overrides

Task = Callable[[DictConfig], float | None]

# Hydra's own flags (``python train.py --help`` lists them): alone, with a value, with an
# optional value from a list.
HYDRA_FLAGS = {"-h", "--help", "--hydra-help", "--version", "--resolve", "-r", "--run", "-m", "--multirun",
               "-sc", "--shell-completion"}  # fmt: skip
HYDRA_VALUE_FLAGS = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                     "-cd", "--config-dir", "--experimental-rerun"}  # fmt: skip
HYDRA_INFO_FLAGS, HYDRA_INFO_VALUES = {"-i", "--info"}, {"all", "config", "defaults", "defaults-tree",
                                                         "plugins", "searchpath"}  # fmt: skip
_OVERRIDE = re.compile(r"^(\+{0,2}[^=+~-][^=]*=|~)")  # key=value, +key=value, ++key=value, ~key


def _cv_shorthand(arg: str) -> str:
    """``cv=5`` -> ``cv.folds=5``, ``cv=none`` -> ``cv.folds=null``, ``cv=3,5`` -> ``cv.folds=3,5``."""
    if not arg.startswith("cv=") or arg.startswith("cv={"):
        return arg
    value = arg.removeprefix("cv=")
    return f"cv.folds={'null' if value.lower() in ('none', 'null', '') else value}"


def launch(config_name: str, task: Task, positional: Sequence[str] = ()) -> None:
    """Run ``task`` as the Hydra app of ``conf/<config_name>.yaml``.

    The config folder is the repository's own (absolute), so a console script finds it from any
    folder. ``PROJECT_ROOT`` (``paths.root_dir``: where data/ and logs/ go) is the folder the
    command runs from, fixed before Hydra resolves its run and sweep folders and inherited by
    DDP worker processes, which run the command again. ``~`` and ``$VARS`` in override values
    are expanded first (Hydra's grammar rejects a bare ``~``). Hydra names the job after the
    module of ``task`` (``transfer_learning.cli.train`` -> ``train``). An argument that is not
    an override (a positional one, ``--name value``) ends the command with one line, the command
    rewritten as overrides when it can be (``positional``: the settings an older form of the
    command took by position).
    """
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        print(
            f"error: {CONF_DIR / f'{config_name}.yaml'} does not exist: the commands read the "
            "repository's conf/ folder; install the package from a clone with `pip install -e .`.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    mistake = older_style(sys.argv, positional)
    if mistake is not None:
        print(f"error: {mistake}", file=sys.stderr)
        raise SystemExit(2)
    os.environ.setdefault("PROJECT_ROOT", os.getcwd())
    sys.argv = expand_overrides(sys.argv)
    if config_name == "train":  # cv=5: short for cv.folds=5 (Hydra reads cv=5 as replacing the cv block)
        sys.argv = [sys.argv[0], *(_cv_shorthand(a) for a in sys.argv[1:])]
    if config_name == "train":  # ckpt_path=...: the run's own settings, unless given again
        from transfer_learning.run.resume import restore_settings

        sys.argv = restore_settings(sys.argv)
    from transfer_learning.cli.checks import check_command

    problem = check_command(config_name, sys.argv)
    if problem is not None:  # before Hydra makes a run folder
        print(f"Error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    # conf/hydra/launcher/submitit_*.yaml set this template's defaults on top of the submitit
    # plugin's schema of the same name; Hydra validates them against it and says so each time.
    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")
    try:
        hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)()
    except KeyboardInterrupt:  # Ctrl-C before a run handles it (composing, building) or pressed twice
        print(f"\nInterrupted (Ctrl-C): {config_name} stopped.", file=sys.stderr)
        raise SystemExit(130) from None


def older_style(argv: Sequence[str], positional: Sequence[str] = ()) -> str | None:
    """None when ``argv`` (``sys.argv``) is Hydra overrides and Hydra's own flags; else a one-line
    message naming the first argument that is neither (a positional argument, ``--name value``,
    ``--name=value``: an older style, or another tool's) and, when every such argument can be read
    as a setting, the command line rewritten as overrides, ready to copy. ``positional`` names the
    settings an older form took by position (``python eval.py best.ckpt``)."""
    program = "python " + argv[0] if argv[0].endswith(".py") else os.path.basename(argv[0])
    args, words, slots, first = list(argv[1:]), [program], list(positional), None
    readable = True
    while args:
        arg = args.pop(0)
        name, has_value, value = arg.partition("=")
        if arg in HYDRA_FLAGS or (has_value and name in HYDRA_VALUE_FLAGS | HYDRA_INFO_FLAGS):
            words.append(arg)
        elif arg in HYDRA_VALUE_FLAGS | HYDRA_INFO_FLAGS:
            takes = arg in HYDRA_VALUE_FLAGS or (args and args[0] in HYDRA_INFO_VALUES)
            words += [arg, *([args.pop(0)] if takes and args else [])]
        elif not arg.startswith("-") and _OVERRIDE.match(arg):
            words.append(arg)
        else:
            first = first or arg
            if arg.startswith("-") and len(arg) > 1:
                if not has_value:  # --name value, or a switch: --name
                    follows = args and not args[0].startswith("-") and "=" not in args[0]
                    value = args.pop(0) if follows else "true"
                setting = name.lstrip("-").replace("-", "_")
            elif slots:
                setting, value = slots.pop(0), arg
            else:
                readable = False
                continue
            words.append(f"{setting}={value}")
    if first is None:
        return None
    start = f"{first!r} is not key=value: {program} takes settings as key=value (Hydra overrides)"
    if not readable:
        return f"{start}; see --help."
    return f"{start}; write: {' '.join([program, *map(shlex.quote, words[1:])])}"
