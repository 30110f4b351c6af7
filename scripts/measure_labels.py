"""Labels as they come, measured with the fixed command lines on data made here (not the repo's):

1. the same images as class folders and as a CSV whose folder names say nothing about the labels:
   `python train.py data=imagefolder data.root=<folders>` against
   `python train.py data=csv data.file=<labels.csv>`: best validation accuracy of each;
2. a multi-label CSV (5 shapes, 1-3 per image, 600 images: 420 train):
   `python train.py data=csv data.file=<multi.csv> data.label_column=labels task=multilabel`
   (feature extraction, the defaults): test mAP and exact match, against a logistic regression per
   class (scikit-learn, its C chosen on validation) on the same frozen EfficientNet-Lite0 features.

    python scripts/measure_labels.py [--workdir /tmp/labels] [--finetune]

Prints the machine, each command and its numbers. Whole processes, as a user runs them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from transfer_learning.readers import SUMMARY_LIMIT, read_json

REPO = Path(__file__).resolve().parents[1]


def train(workdir: Path, name: str, *overrides: str) -> dict:
    run = workdir / "runs" / name
    command = [sys.executable, str(REPO / "train.py"), *overrides, "logger=csv", f"hydra.run.dir={run}",
               f"paths.root_dir={workdir}"]  # fmt: skip
    print("$ python train.py " + " ".join(overrides), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = read_json(run / "summary.json", fix="", limit=SUMMARY_LIMIT)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    return summary


def flat_copy(folders: Path, target: Path) -> Path:
    """The class-folder images under anonymous names in one folder, with labels.csv beside them."""
    (target / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for n, image in enumerate(sorted(folders.glob("*/*.jpg"))):
        shutil.copy(image, target / "images" / f"{n:05d}.jpg")
        rows.append(f"images/{n:05d}.jpg,{image.parent.name}")
    (target / "labels.csv").write_text("\n".join(rows) + "\n")
    return target / "labels.csv"


def logistic_baseline(workdir: Path, run: dict) -> dict[str, float]:
    """A logistic regression per class on the run's own cached features (the frozen backbone's,
    exact view), C chosen per class on validation AP; thresholds chosen on validation F1."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score

    from transfer_learning.features import CachedFeatures
    from transfer_learning.model.metrics import choose_thresholds, multilabel_scores
    from transfer_learning.run.config import build, compose_config

    cfg = compose_config(run["overrides"] + [f"paths.root_dir={workdir}", "data.num_workers=0"])
    datamodule, _ = build(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    cached = {s: datamodule.datasets[s] for s in ("train", "val", "test")}
    assert all(isinstance(c, CachedFeatures) for c in cached.values()), "strategy=feature_extract caches"
    feats = {s: (c.features[0].float().numpy(), c.labels.numpy()) for s, c in cached.items()}  # type: ignore[attr-defined]
    probs: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    for c in range(feats["train"][1].shape[1]):
        best = None
        for strength in (0.01, 0.1, 1.0, 10.0, 100.0):
            model = LogisticRegression(C=strength, max_iter=3000).fit(
                feats["train"][0], feats["train"][1][:, c]
            )
            ap = average_precision_score(feats["val"][1][:, c], model.predict_proba(feats["val"][0])[:, 1])
            if best is None or ap > best[0]:
                best = (ap, model)
        assert best is not None
        for split in probs:
            probs[split].append(best[1].predict_proba(feats[split][0])[:, 1])
    val = torch.tensor(np.stack(probs["val"], 1)), torch.tensor(feats["val"][1])
    test = torch.tensor(np.stack(probs["test"], 1)), torch.tensor(feats["test"][1])
    return multilabel_scores(*test, choose_thresholds(*val))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/measure_labels"))
    parser.add_argument("--finetune", action="store_true", help="also fine-tune the multi-label data")
    args = parser.parse_args()
    from transfer_learning.data.demo import SHAPES, generate_multilabel_shapes, generate_shapes
    from transfer_learning.hardware import cpu_description

    print(f"CPU: {cpu_description()}")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    # Six shapes (hexagons look like circles) drawn small: hard enough that accuracy is not 1.0.
    folders = generate_shapes(work / "folders", images_per_class=100, image_size=40, seed=7, classes=SHAPES)
    csv_file = (
        flat_copy(folders, work / "flat") if not (work / "flat").exists() else work / "flat" / "labels.csv"
    )
    a = train(work, "folders", "data=imagefolder", f"data.root={folders}")
    b = train(work, "csv", "data=csv", f"data.file={csv_file}")
    print(f"class folders: best val/acc {a['best val/acc']}, test/acc {a['test/acc']}")
    print(f"CSV:           best val/acc {b['best val/acc']}, test/acc {b['test/acc']}")
    print(f"difference in val accuracy: {abs(a['best val/acc'] - b['best val/acc']) * 100:.2f} points")

    multi = generate_multilabel_shapes(work / "multi", images=600, image_size=96, seed=11)
    overrides = [
        "data=csv",
        f"data.file={multi / 'labels.csv'}",
        "data.label_column=labels",
        "task=multilabel",
    ]
    m = train(work, "multilabel", *overrides)
    print(f"multi-label feature_extract: {json.dumps({k: v for k, v in m.items() if k.startswith('test/')})}")
    print(f"  images train/val/test: {m['images train/val/test']}")
    base = logistic_baseline(work, {"overrides": overrides})
    rounded = {k: round(v, 4) for k, v in base.items()}
    print(f"logistic regression per class, same features: {json.dumps(rounded)}")
    if args.finetune:
        f = train(work, "multilabel_finetune", *overrides, "strategy=finetune", "trainer.max_epochs=3")
        tested = {k: v for k, v in f.items() if k.startswith("test/")}
        print(f"multi-label finetune (3 epochs): {json.dumps(tested)}")


if __name__ == "__main__":
    main()
