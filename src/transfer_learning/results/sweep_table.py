"""The table of a sweep: which job won, which failed and why.

Each multirun job writes ``job.json`` into its own folder (:func:`transfer_learning.run.sweeps.run_task`);
at the end of the sweep the :class:`SweepSummary` Hydra callback gathers them into
``sweep_results.csv`` and ``sweep_results.md`` in the sweep folder and prints the table.
Gathering files instead of return values works the same for every launcher (in-process,
submitit on this machine or on SLURM) and every sweeper (Hydra's grid, Optuna).
``python scripts/sweep_table.py <sweep dir>`` rebuilds the table of a sweep that is still
running or was interrupted.

Nothing here imports torch or Lightning at module level: Hydra loads the callback for every
command, ``--help`` included.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from transfer_learning.escaping import csv_dict, markdown_cell
from transfer_learning.readers import UntrustedFileError, read_json, read_string_list
from transfer_learning.run.sweeps import JOB_FILE, metric_mode

log = logging.getLogger("train")

TABLE_NAME = "sweep_results"


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
