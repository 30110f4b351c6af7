"""k-fold cross-validation, measured with the commands users type, on data made here:

1. cost: `python train.py data=imagefolder data.root=<shapes>` (feature extraction, the defaults)
   against the same with `cv=5`, as whole processes: wall seconds and their ratio (the features
   of all folds are computed once, so five folds cost far less than five runs);
2. label issues: the same shapes with a share of the training+validation images moved into
   another class's folder (for each of three seeds; the test split is left alone), then `cv=5`:
   how many of the moved images `label_issues.csv` lists (recall) and how many of those it lists
   were moved (precision), and how often the suggested label is the image's true class.

    python scripts/benchmark_cv.py [--workdir /tmp/cv_bench] [--flip 0.05] [--per-class 60]
                                   [--flip-seeds 0,1,2]

Prints the machine first (CPU, cores, bf16 support), then each command and its numbers.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from transfer_learning.data.demo import generate_shapes
from transfer_learning.data.sources.base import Listing
from transfer_learning.data.splits import split_listing
from transfer_learning.hardware import cpu_description
from transfer_learning.readers import SUMMARY_LIMIT, read_csv_records, read_json

REPO = Path(__file__).resolve().parents[1]
FRACTIONS = {"val": 0.2, "test": 0.2}  # data=imagefolder's defaults


def train(workdir: Path, name: str, *overrides: str) -> tuple[float, Path]:
    """`python train.py <overrides>` in its own folder; wall seconds and the run folder."""
    run = workdir / name
    shutil.rmtree(run, ignore_errors=True)
    command = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run}", "logger=csv", *overrides]
    print("$ " + " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=workdir, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started, run


def flip_labels(source: Path, target: Path, share: float, seed: int) -> dict[str, str]:
    """A copy of ``source`` with ``share`` of its training+validation images moved to another
    class's folder: ``{new path: true class}`` of every moved image."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    classes = sorted(p.name for p in target.iterdir() if p.is_dir())
    files = sorted(target.glob("*/*.jpg"))
    targets = [[classes.index(f.parent.name)] for f in files]
    listing = Listing(files, targets, classes, "multiclass", where=str(target))
    splits = split_listing(listing, FRACTIONS, 42)  # the run's own split (data.seed 42): test kept
    pool = sorted(splits["train"] + splits["val"])
    rng = random.Random(seed)
    moved: dict[str, str] = {}
    for i in rng.sample(pool, round(share * len(pool))):
        true = files[i].parent.name
        wrong = rng.choice([c for c in classes if c != true])
        new = target / wrong / f"flipped_{true}_{files[i].name}"
        files[i].rename(new)
        moved[str(new)] = true
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cv_bench"))
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--flip-seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2])
    args = parser.parse_args()
    print(f"machine: {cpu_description()}")
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    shapes = generate_shapes(workdir / "shapes", images_per_class=args.per_class, image_size=96)
    data = ["data=imagefolder", "input.image_size=128"]

    # 1. cost (each run builds its own feature cache: paths.root_dir is its own folder)
    single, _ = train(workdir, "single", *data, f"data.root={shapes}", f"paths.root_dir={workdir / 'a'}")
    folds, cv_run = train(
        workdir, "cv", *data, f"data.root={shapes}", f"cv={args.folds}", f"paths.root_dir={workdir / 'b'}"
    )
    cv_summary = read_json(cv_run / "summary.json", fix="", limit=SUMMARY_LIMIT)
    print(f"single run: {single:.1f} s; cv={args.folds}: {folds:.1f} s = {folds / single:.2f}x a single run "
          f"(test/acc {cv_summary['test/acc']} over folds)")  # fmt: skip

    # 2. label issues on flipped labels
    totals = [0, 0, 0]  # listed, flipped among them, flipped in all
    for seed in args.flip_seeds:
        listed, hits, moved = flipped_run(workdir, shapes, data, args.flip, seed, args.folds)
        totals = [totals[0] + listed, totals[1] + hits, totals[2] + moved]
    listed, hits, moved = totals
    print(f"all {len(args.flip_seeds)} seeds: listed {listed}, {hits} of them flipped: precision "
          f"{hits / max(listed, 1):.3f}, recall {hits / max(moved, 1):.3f} ({hits}/{moved})")  # fmt: skip


def flipped_run(
    workdir: Path, shapes: Path, data: list[str], share: float, seed: int, folds: int
) -> tuple[int, int, int]:
    """One cv run on the shapes with ``share`` of the labels flipped (seed ``seed``): prints and
    returns how many images it listed, how many of those were flipped, how many were flipped."""
    flipped = workdir / f"flipped{seed}"
    moved = flip_labels(shapes, flipped, share, seed=seed)
    _, run = train(workdir, f"flipped_cv{seed}", *data, f"data.root={flipped}", f"cv={folds}",
                   f"paths.root_dir={workdir / f'c{seed}'}")  # fmt: skip
    _, listed = read_csv_records(run / "label_issues.csv")
    scored = {r["file"] for r in read_csv_records(run / "oof_predictions.csv")[1]}
    outside = [file for file in moved if file not in scored]  # the run split the flipped data its own way
    moved = {file: true for file, true in moved.items() if file in scored}
    if outside:
        print(f"{len(outside)} flipped image(s) fell into the test split: not counted")
    hits = [r for r in listed if r["file"] in moved]
    right = sum(r["suggested"] == moved[r["file"]] for r in hits)
    summary = read_json(run / "summary.json", fix="", limit=SUMMARY_LIMIT)
    print(f"seed {seed}: flipped {len(moved)} of {len(scored)} training+validation images ({share:.0%}); "
          f"label issues: {summary['label issues']}; cv test/acc {summary['test/acc']}")  # fmt: skip
    precision = len(hits) / len(listed) if listed else float("nan")
    print(f"listed {len(listed)}: {len(hits)} flipped -> precision {precision:.3f}, "
          f"recall {len(hits) / len(moved):.3f} ({len(hits)}/{len(moved)}); suggested label = true class "
          f"for {right} of {len(hits)}")  # fmt: skip
    for row in listed[:12]:
        file = Path(row["file"])
        flipped_mark = "flipped" if row["file"] in moved else ""
        print(f"  {row['rank']:>3} {file.parent.name}/{file.name}: given {row['given']}, "
              f"suggested {row['suggested']} ({row['score']}) {flipped_mark}")  # fmt: skip
    return len(listed), len(hits), len(moved)


if __name__ == "__main__":
    main()
