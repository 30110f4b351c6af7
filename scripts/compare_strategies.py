"""Every strategy on the same data with the same epoch budget: the README's comparison table.

`python scripts/compare_strategies.py [--data demo digits] [--epochs 5]
[--strategies feature_extract finetune finetune+ema gradual_unfreeze lp_ft layer_decay]
[overrides...]` runs
`python train.py` once per data set and strategy, each as a whole process with that strategy's
own defaults except `trainer.max_epochs` (the shared budget; feature extraction normally runs
30 cheap cached epochs), and prints a Markdown table of best validation accuracy, test accuracy
and macro F1 of the best checkpoint, and wall time. `gradual_unfreeze`'s defaults are fastai's
`fine_tune` recipe (one frozen epoch, then everything with discriminative rates).
`<strategy>+ema` / `<strategy>+swa` adds weight averaging (`callbacks=ema` / `callbacks=swa`).

Data: `demo` (the generated shapes, 180/60/60 images), `digits` (scikit-learn's 1797 real 8x8
handwritten-digit scans upscaled, 10 classes, written once under data/digits), or any
ImageFolder root. `--image-size` sets input.image_size for all of them (default 96: the 2-core
CPU this table was made on takes ~1 s per fine-tuning step at 224 px).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmark import REPO, timed  # scripts/ is on sys.path when this file runs
from linear_probe import write_digits

from transfer_learning.errors import count
from transfer_learning.readers import SUMMARY_LIMIT, read_json

STRATEGIES = ("feature_extract", "finetune", "finetune+ema", "gradual_unfreeze", "lp_ft", "layer_decay")


def data_overrides(name: str) -> list[str]:
    if name == "demo":
        return []
    if name == "digits":
        return ["data=imagefolder", f"data.root={write_digits(Path('data/digits').absolute())}"]
    return ["data=imagefolder", f"data.root={Path(name).absolute()}"]


def run(row: str, data: str, epochs: int, image_size: int, extra: list[str], work: Path) -> dict:
    """One row: ``strategy`` or ``strategy+ema`` (``+swa``: callbacks=swa)."""
    strategy, _, averaging = row.partition("+")
    callbacks = [f"callbacks={averaging}"] if averaging else []
    folder = work / f"{Path(data).name}-{row}"
    command = [sys.executable, str(REPO / "train.py"), *data_overrides(data), f"strategy={strategy}",
               *callbacks, f"trainer.max_epochs={epochs}", f"input.image_size={image_size}", "logger=csv",
               "worst_samples=0", f"hydra.run.dir={folder}", *extra]  # fmt: skip
    seconds, _, _ = timed(command, Path.cwd())
    summary = read_json(folder / "summary.json", fix="", limit=SUMMARY_LIMIT)
    return {"seconds": seconds, **{k: summary[k] for k in ("best val/acc", "test/acc", "test/f1")}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", nargs="+", default=["demo", "digits"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="compare-strategies-"))
    lines = [
        f"{count(args.epochs, 'epoch')} each, {args.image_size} px, EfficientNet-Lite0, seed 42",
        "",
        "| data | strategy | best val acc | test acc | test macro F1 | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for data in args.data:
        for strategy in args.strategies:
            print(f"{data}: {strategy} ...", flush=True)
            r = run(strategy, data, args.epochs, args.image_size, args.overrides, work)
            lines.append(f"| {Path(data).name} | `{strategy}` | {r['best val/acc']:.4f} | "
                         f"{r['test/acc']:.4f} | {r['test/f1']:.4f} | {r['seconds']:.0f} |")  # fmt: skip
            print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))
    print(f"\nruns: {work}")


if __name__ == "__main__":
    main()
