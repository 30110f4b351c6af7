"""The results table of a sweep folder, rebuilt from its jobs' job.json files: for a sweep that is
still running (submitit, SLURM) or was interrupted. Writes sweep_results.csv and .md there too.

    python scripts/sweep_table.py logs/train/multiruns/<date> [--metric val/acc_best] [--mode max]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from transfer_learning.errors import TransferLearningError
from transfer_learning.results.sweep_table import collect, summarize_sweep, sweep_metric
from transfer_learning.run.sweeps import metric_mode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--metric",
        default="auto",
        help="the column to sort by (default: the jobs' optimized_metric, e.g. val/acc_best)",
    )
    parser.add_argument("--mode", choices=("max", "min"), help="default: min for losses, else max")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder (expected logs/<task>/multiruns/<date>)")
    sweep_dir = args.sweep_dir.resolve()
    try:  # a job's files are data: one that is not what a job writes is named, not followed
        metric = sweep_metric(OmegaConf.create({"optimized_metric": args.metric}), collect(sweep_dir))
        _, text = summarize_sweep(sweep_dir, metric, args.mode or metric_mode(None, metric))
    except TransferLearningError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)


if __name__ == "__main__":
    main()
