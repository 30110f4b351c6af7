"""Is the default feature extraction as good as a tuned linear probe on the same features?

`python scripts/linear_probe.py --data DIR [overrides...]` runs `python train.py
data=imagefolder data.root=DIR` (the defaults, plus any Hydra overrides) in this process, then
fits scikit-learn's LogisticRegression on the very features the run cached, with C picked on
the validation split, and prints both. `--data digits` first writes scikit-learn's handwritten
digits (1797 real 8x8 scans, 10 classes) as PNG files in ImageFolder layout; `--data demo` uses
the generated demo shapes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def write_digits(root: Path) -> Path:
    """scikit-learn's digits as 32 px grayscale PNGs: root/<digit>/<n>.png."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if root.exists():
        return root
    digits = load_digits()
    for n, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.NEAREST).save(
            folder / f"{n:04d}.png"
        )
    return root


def probe(split_features: dict, seed: int = 0) -> dict[str, float]:
    """LogisticRegression on cached features: C chosen on val, scored on val and test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def xy(name: str) -> tuple[np.ndarray, np.ndarray]:
        ds = split_features[name]
        return ds.features[0].numpy(), ds.labels.numpy()

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = xy("train"), xy("val"), xy("test")
    scaler = StandardScaler().fit(x_train)
    best: tuple[float, float, LogisticRegression] | None = None
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(
            scaler.transform(x_train), y_train
        )
        score = model.score(scaler.transform(x_val), y_val)
        if best is None or score > best[0]:
            best = (score, c, model)
    assert best is not None
    score, c, model = best
    return {"C": c, "val/acc": score, "test/acc": model.score(scaler.transform(x_test), y_test)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="digits", help="an ImageFolder root, `digits` or `demo`")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the template run")
    args = parser.parse_args()
    from transfer_learning.pipelines.train import train
    from transfer_learning.run.config import build, compose_config  # torch: not for --help

    work = Path(tempfile.mkdtemp(prefix="linear-probe-"))
    if args.data == "digits":  # under ./data like the demo set, so later runs hit the feature cache
        data = ["data=imagefolder", f"data.root={write_digits(Path('data/digits').absolute())}"]
    elif args.data == "demo":
        data = []
    else:
        data = ["data=imagefolder", f"data.root={args.data}"]
    cfg = compose_config([*data, "logger=csv", *args.overrides], output_dir=work / "run")
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    datamodule, _ = build(cfg)  # the same key: every split is a cache hit
    datamodule.prepare_data()
    datamodule.setup()
    reference = probe(datamodule.datasets)
    summary = metrics["summary"]
    rows = [
        (f"template defaults ({seconds:.0f} s)", summary["best val/acc"], summary["test/acc"]),
        (f"LogisticRegression, C={reference['C']}", reference["val/acc"], reference["test/acc"]),
    ]
    print(f"\n{'':<34}{'val/acc':>9}{'test/acc':>10}")
    for name, val, test in rows:
        print(f"{name:<34}{val:>9.4f}{test:>10.4f}")
    gap = round(100 * (reference["test/acc"] - summary["test/acc"]), 1) + 0.0  # no "-0.0"
    print(f"test accuracy gap: {gap:+.1f} points (positive: the probe is ahead)")


if __name__ == "__main__":
    main()
