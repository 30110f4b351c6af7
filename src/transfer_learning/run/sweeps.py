"""Running one job of ``python train.py`` (a run, or a job of a Hydra multirun): its record
(``job.json``, which :mod:`transfer_learning.results.sweep_table` gathers into the sweep's
table), its errors as one line, its own output folder and process group, and the
:class:`OutputFolderCheck` Hydra callback.

Nothing here imports torch or Lightning at module level: Hydra loads the callback for every
command, ``--help`` included.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transfer_learning.errors import ConfigError, find_user_error, user_message
from transfer_learning.run.config import check_writable
from transfer_learning.run.console import quiet_console

log = logging.getLogger("train")

JOB_FILE = "job.json"
# Exit code of a run stopped by SIGTERM after saving its checkpoint (128 + SIGTERM, as shells do).
PREEMPTED_EXIT_CODE = 143
# The script this process runs (train.py, a fork's own, wherever the package is installed),
# resolved before anything can change the working folder: DDP workers of a multirun job run it
# again as a single run.
_STARTED_AS = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""


def entry_command() -> list[str]:
    """The command that started this process, for DDP workers to run again: ``python <script>``,
    or ``python -m <module>`` for a module run that way."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return [sys.executable, "-m", spec.name.removesuffix(".__main__")]
    return [sys.executable, _STARTED_AS]


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _process_rank() -> int:
    """This process's global rank as the launcher set it (SLURM tasks, torchrun), else 0."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def metric_mode(cfg: DictConfig | None, metric: str) -> str:
    """ "max" or "min" for the optimised metric: the sweeper's direction when it has one,
    else "min" for losses and errors and "max" for everything else."""
    direction = OmegaConf.select(cfg, "hydra.sweeper.direction") if cfg is not None else None
    if isinstance(direction, str):
        return "min" if direction.lower().startswith("min") else "max"
    return "min" if any(word in metric for word in ("loss", "error")) else "max"


_settled = False


def settle_imports() -> None:
    """Once per process, before its first job: hide what is alive now from the garbage collector
    (``gc.freeze``). That is the imported libraries (torch, Lightning, W&B: ~0.5M objects that
    live as long as the process); each full collection would walk them again, ~0.3 s a time in
    the middle of a run. The jobs' own objects are collected as usual."""
    global _settled
    if not _settled:
        import gc

        gc.freeze()
        _settled = True


def run_task(cfg: DictConfig, task: Callable[[DictConfig], Mapping[str, Any]]) -> float | None:
    """Run ``task(cfg)`` as ``train.py`` does and return the optimised metric for sweepers.

    A single run stops with exit code 2 and one message on a user error (a bad path, a bad
    setting), and raises anything else. A multirun job never takes the sweep down: it records
    its error in ``job.json`` (the traceback goes to the job's log), returns None (Optuna marks
    the trial failed) and the sweep goes on; the sweep summary lists it and the command exits
    non-zero at the end.
    """
    quiet_console()
    settle_imports()
    multirun = in_multirun()
    output_dir = Path(str(cfg.paths.output_dir))
    started = time.time()
    record: dict[str, Any] = {"status": "failed", "error": None, "metrics": {}}
    try:
        with isolated_job(output_dir) if multirun else _nothing():
            metrics = task(cfg)
        record.update(status="ok", metrics=_numbers(metrics))
        record["epochs"] = (metrics.get("summary") or {}).get("epochs run")
        record["best_checkpoint"] = metrics.get("best_checkpoint") or None
    except Exception as exc:
        if type(exc).__name__ == "RunFinished":  # ckpt_path= of a finished run: nothing to do
            log.info("%s", exc)
            record.update(status="finished", error=None)
            return None
        if type(exc).__name__ == "Preempted":  # preemption.Preempted; torch is not imported here
            record.update(status="preempted", error=_one_line(str(exc)))
            log.error("%s", exc)
            raise SystemExit(getattr(exc, "exit_code", PREEMPTED_EXIT_CODE)) from None
        user_error = find_user_error(exc)
        message = user_message(user_error) if user_error else f"{type(exc).__name__}: {exc}"
        record["error"] = _one_line(message)
        if user_error is not None:
            if multirun or not remove_unused_run_folder(output_dir):
                log.error("%s\n(Outputs written so far are kept in %s)", message, output_dir)
            else:
                log.error("%s", message)
            if not multirun:
                sys.exit(2)
        elif not multirun:
            raise
        else:
            log.error("This job failed; the sweep goes on.\n%s", traceback.format_exc())
    finally:
        if multirun and _process_rank() == 0:
            record.update(
                wall_s=round(time.time() - started, 1),
                output_dir=str(output_dir),
                host=socket.gethostname(),
                pid=os.getpid(),
                # The scheduler's id of this job: SLURM's, or submitit's on this machine.
                cluster_job_id=os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID"),
            )
            _write_job(cfg, {"optimized_metric": optimized_metric(cfg, record["metrics"]), **record})
    value = record["metrics"].get(optimized_metric(cfg, record["metrics"]))
    return float(value) if value is not None else None


def remove_unused_run_folder(folder: Path) -> bool:
    """Remove a run folder that a command stopped by a mistake made and left with nothing but
    Hydra's records (``.hydra/``, the ``<job>.log``); a folder with anything else in it (a
    resumed run's checkpoints, a run's own settings) stays. True when it was removed."""
    try:
        files = [p.relative_to(folder) for p in folder.rglob("*") if not p.is_dir()]
    except OSError:
        return False
    kept = (Path(".hydra") / "config.yaml", Path(".hydra") / "hydra.yaml", Path(".hydra") / "overrides.yaml")
    if not files or not all(f in kept or (len(f.parts) == 1 and f.suffix == ".log") for f in files):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()


def optimized_metric(cfg: DictConfig, metrics: Mapping[str, Any]) -> str:
    """The metric a job returns: ``optimized_metric`` as set, or for ``auto`` (which the run
    resolves to ``<module.monitor>_best``) the task's best validation score among ``metrics``:
    ``val/map_best`` for a multilabel run, ``val/acc_best`` otherwise."""
    metric = str(cfg.get("optimized_metric") or "")
    if metric != "auto":
        return metric
    return "val/map_best" if "val/map_best" in metrics else "val/acc_best"


@contextmanager
def _nothing() -> Iterator[None]:
    try:
        yield
    finally:
        close_process_group()


def close_process_group() -> None:
    """Leave the DDP process group a run made, explicitly: gloo's threads torn down at
    interpreter exit instead can abort the process (``terminate called without an active
    exception``) after the run has finished."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_job(cfg: DictConfig, record: dict[str, Any]) -> None:
    hydra = HydraConfig.get()
    record = {
        "job": hydra.job.num,
        "overrides": list(hydra.overrides.task),
        **record,
    }
    path = Path(record["output_dir"]) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


# -- DDP inside a multirun job ---------------------------------------------------------------


@contextmanager
def isolated_job(output_dir: Path) -> Iterator[None]:
    """Keep one multirun job's DDP processes to that job.

    Lightning starts DDP workers by re-running the command line with ``hydra.run.dir`` set to
    the *run* folder: in a multirun that is ``-m`` and every swept value again, written to the
    wrong folder. Here workers run ``train.py`` once, with this job's overrides, in this job's
    folder. Lightning also leaves ``MASTER_PORT``, ``LOCAL_RANK`` and the process group behind,
    and the next job in the same process would take them as its own (waiting forever for
    workers that never start); they are removed after each job, so every job finds a free port.
    """
    from transfer_learning.lightning_internals import ddp_worker_command

    overrides = list(HydraConfig.get().overrides.task)
    environment = dict(os.environ)

    def worker_command(local_rank: int) -> tuple[list[str], str]:
        command = [*entry_command(), *overrides]
        command += [f"hydra.run.dir={_quoted(str(output_dir))}", f"hydra.job.name=ddp_process_{local_rank}"]
        return [*command, "hydra.output_subdir=null"], str(HydraConfig.get().runtime.cwd)

    try:
        with ddp_worker_command(worker_command):
            yield
    finally:
        close_process_group()
        os.environ.clear()
        os.environ.update(environment)


def _quoted(value: str) -> str:
    """A Hydra override value that stays one string whatever characters the path holds."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class OutputFolderCheck(Callback):
    """Hydra callback: a run or sweep folder that cannot be created stops the command with one
    message naming the setting, before Hydra fails on it with a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.sweep.dir), "hydra.sweep.dir")

    @staticmethod
    def _check(folder: str, setting: str) -> None:
        try:
            check_writable(Path(folder), setting)
        except ConfigError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            sys.exit(2)
