"""Running one job of ``python train.py`` (a run, or a job of a Hydra multirun) and summing up
a sweep: which job won, which failed and why.

Each multirun job writes ``job.json`` into its own folder; at the end of the sweep the
:class:`SweepSummary` Hydra callback gathers them into ``sweep_results.csv`` and
``sweep_results.md`` in the sweep folder and prints the table. Gathering files instead of
return values works the same for every launcher (in-process, submitit on this machine or on
SLURM) and every sweeper (Hydra's grid, Optuna). ``python scripts/sweep_table.py <sweep dir>``
rebuilds the table of a sweep that is still running or was interrupted.

Nothing here imports torch or Lightning at module level: Hydra loads the callback for every
command, ``--help`` included.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from transfer_learning.errors import ConfigError, find_user_error, user_message
from transfer_learning.escaping import csv_dict, markdown_cell
from transfer_learning.readers import UntrustedFileError, read_json, read_string_list
from transfer_learning.run.config import check_writable
from transfer_learning.run.console import quiet_console

log = logging.getLogger("train")

JOB_FILE = "job.json"
# Exit code of a run stopped by SIGTERM after saving its checkpoint (128 + SIGTERM, as shells do).
PREEMPTED_EXIT_CODE = 143
TABLE_NAME = "sweep_results"
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
    from lightning.pytorch.strategies.launchers import subprocess_script

    overrides = list(HydraConfig.get().overrides.task)
    environment = dict(os.environ)

    def worker_command(local_rank: int) -> tuple[list[str], str]:
        command = [*entry_command(), *overrides]
        command += [f"hydra.run.dir={_quoted(str(output_dir))}", f"hydra.job.name=ddp_process_{local_rank}"]
        return [*command, "hydra.output_subdir=null"], str(HydraConfig.get().runtime.cwd)

    original = subprocess_script._hydra_subprocess_cmd
    subprocess_script._hydra_subprocess_cmd = worker_command
    try:
        yield
    finally:
        subprocess_script._hydra_subprocess_cmd = original
        close_process_group()
        os.environ.clear()
        os.environ.update(environment)


def _quoted(value: str) -> str:
    """A Hydra override value that stays one string whatever characters the path holds."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- the sweep table -------------------------------------------------------------------------


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per job folder of the sweep (``job.json``); a job folder without one (still
    running, or killed) gets a record that says so."""
    records = []
    for config in sorted(sweep_dir.glob("**/.hydra/overrides.yaml")):
        folder = config.parent.parent
        job_file = folder / JOB_FILE
        if job_file.is_file():
            records.append(job_record(job_file))
            continue
        overrides = read_string_list(config, fix=f"Delete {folder}, or the sweep's table leaves it out.")
        number = folder.name
        records.append(
            {
                "job": int(number) if number.isdigit() else number,
                "overrides": overrides,
                "status": "no result",
                "error": "no job.json: still running, or killed before it finished",
                "metrics": {},
                "output_dir": str(folder),
            }
        )
    return records


def job_record(path: Path) -> dict[str, Any]:
    """A job's ``job.json`` (plain values), checked for the fields the table reads."""
    fix = "Delete it (the table then shows the job as unfinished), or run the job again."
    record = read_json(path, fix=fix)
    fields = {"overrides": list, "metrics": dict, "status": str}
    if not isinstance(record, dict):
        raise UntrustedFileError(f"refusing {path}: it is not a JSON object. {fix}")
    for name, kind in fields.items():
        if not isinstance(record.get(name), kind):
            raise UntrustedFileError(f"refusing {path}: its {name!r} is not a {kind.__name__}. {fix}")
    if not all(isinstance(o, str) for o in record["overrides"]):
        raise UntrustedFileError(f"refusing {path}: its 'overrides' are not all text. {fix}")
    return record


def _varying(records: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Each job's overrides without those every job shares (they say nothing about the job)."""
    sets = [list(r.get("overrides") or []) for r in records]
    shared = set.intersection(*map(set, sets)) if len(sets) > 1 else set()
    return [[o for o in overrides if o not in shared] for overrides in sets]


def sweep_rows(records: Sequence[Mapping[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Table rows sorted by ``metric`` (best first, ``mode`` max or min), failed jobs last; the
    best job has ``best = "*"``."""

    def value(record: Mapping[str, Any], key: str) -> float | None:
        v = (record.get("metrics") or {}).get(key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    # The test score beside the validation one: test/map for val/map_best, test/acc otherwise.
    test_key = "test/acc"
    if metric.startswith("val/"):
        test_key = "test/" + metric.removeprefix("val/").removesuffix("_best")
    rows = []
    for record, overrides in zip(records, _varying(records), strict=True):
        ok = record.get("status") == "ok"
        rows.append(
            {
                "best": "",
                "job": record.get("job"),
                "overrides": " ".join(overrides) or "(none)",
                metric: value(record, metric),
                test_key: value(record, test_key),
                f"{test_key} 95 %": _interval(record, test_key),
                "cv ± std": _spread(record, metric, test_key),
                "epochs": record.get("epochs"),
                "wall_s": round(float(record["wall_s"])) if record.get("wall_s") is not None else None,
                "status": "ok" if ok else f"{record.get('status')}: {record.get('error')}",
                "output_dir": record.get("output_dir"),
            }
        )
    sign = -1.0 if mode == "max" else 1.0

    def order(row: Mapping[str, Any]) -> tuple[int, float, Any]:
        score = row[metric]
        rank = 0 if row["status"] == "ok" and score is not None else 1 if row["status"] == "ok" else 2
        return rank, sign * score if score is not None else 0.0, str(row["job"])

    if not any(row["cv ± std"] for row in rows):  # no job cross-validated: no such column
        for row in rows:
            del row["cv ± std"]
    rows.sort(key=order)
    if rows and rows[0]["status"] == "ok" and rows[0][metric] is not None:
        rows[0]["best"] = "*"
    return rows


def _spread(record: Mapping[str, Any], metric: str, test_key: str) -> str:
    """A cv=K job (its numbers are means over folds): ``5 folds: ± 0.0120, ± 0.0167``, the
    standard deviations of ``metric`` and ``test_key``; empty for a job without folds."""
    metrics = record.get("metrics") or {}
    folds = metrics.get("cv/folds")
    spreads = [metrics.get(f"{key}_std") for key in (metric, test_key)]
    if not isinstance(folds, int | float) or not all(isinstance(v, int | float) for v in spreads):
        return ""
    return f"{int(folds)} folds: " + ", ".join(f"± {v:.4f}" for v in spreads)


def _interval(record: Mapping[str, Any], key: str) -> str:
    """``[0.911, 0.997]``: the job's 95 % interval of ``key`` (empty without one)."""
    metrics = record.get("metrics") or {}
    low, high = metrics.get(f"{key}_ci95_low"), metrics.get(f"{key}_ci95_high")
    if not isinstance(low, int | float) or not isinstance(high, int | float):
        return ""
    return f"[{low:.3f}, {high:.3f}]"


_LONG_FLOAT = re.compile(r"(?<==)(-?\d*\.\d{5,}(?:e-?\d+)?|-?\d\.\d+e-?\d+)(?=\s|$)")


def short_numbers(overrides: str) -> str:
    """Overrides as people read them: a sampled ``strategy.head_lr=0.0031622776601683794``
    (Optuna draws 17 digits) as ``strategy.head_lr=0.003162``; the CSV keeps the exact value."""
    return _LONG_FLOAT.sub(lambda m: f"{float(m[1]):.4g}", overrides)


def _cell(value: Any, column: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return markdown_cell(short_numbers(value) if column == "overrides" else value)


def write_tables(rows: Sequence[Mapping[str, Any]], sweep_dir: Path) -> tuple[Path, Path, str]:
    """``sweep_results.csv`` and ``sweep_results.md`` in the sweep folder; returns both paths and
    the Markdown text."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else ["best", "job", "overrides", "status", "output_dir"]
    csv_path = sweep_dir / f"{TABLE_NAME}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(csv_dict(dict(row)) for row in rows)  # override values are the user's text
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c], c) for c in columns) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    md_path = sweep_dir / f"{TABLE_NAME}.md"
    md_path.write_text(markdown)
    return csv_path, md_path, markdown


def summarize_sweep(sweep_dir: Path, metric: str, mode: str) -> tuple[list[dict[str, Any]], str]:
    """Collect, sort and write the table of a sweep folder; return its rows and a printable text."""
    rows = sweep_rows(collect(sweep_dir), metric, mode)
    csv_path, md_path, markdown = write_tables(rows, sweep_dir)
    failed = sum(r["status"].startswith("failed") for r in rows)
    unfinished = sum(r["status"].startswith("no result") for r in rows)
    best = rows[0] if rows and rows[0]["best"] else None
    bar = "=" * 72
    counts = f"{len(rows)} jobs, {failed} failed" + (f", {unfinished} without a result" if unfinished else "")
    text = [bar, f"  Sweep summary: {counts}, sorted by {metric} ({mode})", bar]
    text.append(markdown.rstrip())
    if best is not None:
        text.append(
            f"best: job {best['job']} ({short_numbers(best['overrides'])})  {metric}={_cell(best[metric])}"
        )
        text.append(f"      {best['output_dir']}")
        runner_up = rows[1] if len(rows) > 1 and rows[1]["status"] == "ok" else None
        if runner_up is not None:
            from transfer_learning.results.comparison import describe_lead  # torch: not for --help

            test_key = next(c for c in rows[0] if c.startswith("test/"))
            lead = describe_lead(best, runner_up, test_key)
            text.append(lead)
            md_path.write_text(markdown + "\n" + lead + "\n")
    text += [f"table: {md_path}  (and {csv_path.name})", bar]
    return rows, "\n".join(text)


NOT_SET = (None, "", "auto")


def sweep_metric(config: DictConfig, records: Sequence[Mapping[str, Any]]) -> str:
    """The metric a sweep is sorted by: ``optimized_metric``, or with ``optimized_metric=auto``
    the one its jobs resolved it to (``<module.monitor>_best``: val/acc_best for multiclass data,
    val/map_best for multilabel), recorded in each job's ``job.json``."""
    metric = str(config.get("optimized_metric") or "auto")
    if metric != "auto":
        return metric
    resolved = [
        str(r["optimized_metric"]) for r in records if r.get("optimized_metric") not in (None, "", "auto")
    ]
    return resolved[0] if resolved else "val/acc_best"


class SweepSummary(Callback):
    """Hydra callback (conf/hydra/default.yaml): the results table at the end of a multirun.

    Exits with code 1 after the table when a job failed, so schedulers and CI notice."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = self.sweep_dir or Path(str(config.hydra.sweep.dir)).resolve()
        metric = sweep_metric(config, collect(sweep_dir))
        rows, text = summarize_sweep(sweep_dir, metric, metric_mode(config, metric))
        print(text, flush=True)
        failed = [row for row in rows if row["status"] != "ok"]
        if failed:
            log.error(
                "%d of %d sweep jobs failed (see the status column and each job's train.log).",
                len(failed), len(rows),
            )  # fmt: skip
            sys.exit(1)


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
