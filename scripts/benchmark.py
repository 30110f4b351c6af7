"""Feature extraction and fine-tuning: this template against the plain PyTorch loop.

`python scripts/benchmark.py [--model efficientnet_lite0] [--epochs 10] [--data ROOT]` runs, on
the same data, backbone and number of epochs, each as a whole process (imports included, as a
user experiences it):

  (a) the classic hand-written loop: requires_grad=False on the backbone (feature extraction) or
      everything trainable (fine-tuning), a replaced head, SGD with momentum, torchvision
      ImageFolder with RandomResizedCrop + flip, NCHW, float32; on a CPU with native bf16, the
      same fine-tuning loop again under bf16 autocast (its best precision there);
  (b) `python train.py data=imagefolder ...` with `strategy=feature_extract` twice (the second
      run finds the feature cache) and `strategy=finetune` (channels_last and
      `trainer.precision=auto` are the defaults: bf16-mixed where the hardware runs bf16 natively).

It prints wall time, training images/s, final validation accuracy and peak memory of each, and
the speed ratios of (b) to (a) (fine-tuning: to the faster plain-loop run). Without --data it
writes a small data set of generated shapes (60 training and 16 validation images per class,
5 classes) under data/benchmark_shapes.

`--floor 500,2500` measures instead the template's feature extraction against its floor at each
number of images (5 classes of generated 320 px JPEGs under data/benchmark_floor_<n>, split by
the template as a user's folders would be): the floor is one whole process that imports torch,
builds the network, decodes every image once and runs one channels_last forward pass over it
(bf16 autocast where the CPU or GPU runs bf16 natively, loader workers as the template uses);
then `python train.py data=imagefolder data.root=... strategy=feature_extract` twice, as typed
(the first run builds the feature cache, the second finds it). It prints each run's wall seconds,
its ratio to the floor, and the cache hit's start-up: seconds from the process start to its
features loaded (imports, config, network, loggers), read from the run's train.log. With
`--float32` the floor and the template's features are float32 even where bf16 is native (the
conditions of a CPU without it, on this one).

`--frozen-epoch` measures instead, in one process, one training epoch of
`strategy=feature_extract strategy.cache_features=false strategy.bf16=false` (the baseline: the
backbone's float32 forward pass only),
the frozen first epoch of `strategy=gradual_unfreeze`, and a `strategy=finetune` epoch (forward
and backward through everything), each `--repeats` times interleaved (the fastest counts), and
prints each epoch's time as a ratio of the baseline's (fastest against fastest, and the median
of the ratios within a round, which a busy machine disturbs less).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmark_baselines import floor_pass, plain_loop  # scripts/ is on sys.path when this file runs

from transfer_learning.errors import count
from transfer_learning.readers import SUMMARY_LIMIT, read_csv_records, read_json

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the floor


def log_seconds_after(run: Path, started: float, message: str) -> float | None:
    """Seconds from ``started`` (a time.time()) to the first line of the run's train.log that
    contains ``message``."""
    import datetime

    for line in (run / "train.log").read_text().splitlines():
        if message in line and line.startswith("["):
            stamp = datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp() - started
    return None


def floor_benchmark(sizes: list[int], model: str, float32: bool = False) -> None:
    from transfer_learning.data.demo import generate_shapes
    from transfer_learning.hardware import choose_precision, cpu_description

    rows = []
    for size in sizes:
        data = generate_shapes(Path(f"data/benchmark_floor_{size}").absolute(), images_per_class=size // 5,
                               image_size=320, seed=size)  # fmt: skip
        work = Path(tempfile.mkdtemp(prefix="benchmark-floor-"))  # fresh logs and a cold feature cache
        python = sys.executable
        print(f"{size} images: the floor ...", flush=True)
        precision = ["--float32"] if float32 else []
        floor_s, floor_mb, text = timed([python, str(Path(__file__).resolve()), f"--floor-run={data}",
                                         f"--model={model}", *precision], work)  # fmt: skip
        floor = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
        command = [python, str(REPO / "train.py"), "data=imagefolder", f"data.root={data}", f"model={model}",
                   "strategy=feature_extract", *(["strategy.bf16=false"] if float32 else [])]  # fmt: skip
        print(f"{size} images: first run ...", flush=True)
        first_s, first_mb, _ = timed(command, work)
        print(f"{size} images: cache hit ...", flush=True)
        started = time.time()
        hit_s, hit_mb, text = timed(command, work)
        marker = next(line for line in text.splitlines() if line.strip().startswith("output dir"))
        run = Path(marker.split(maxsplit=2)[2])
        startup = log_seconds_after(run, started, "Feature cache hit for train")
        summary = read_json(run / "summary.json", fix="", limit=SUMMARY_LIMIT)
        rows.append({"images": floor["images"], "floor": floor_s, "first": first_s, "hit": hit_s,
                     "startup": startup, "bf16": floor["bf16"], "acc": summary.get("test/acc"),
                     "memory": max(floor_mb, first_mb, hit_mb)})  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    import torch

    print(f"\n{cpu_description()}, torch {torch.__version__}, {model}, feature extraction "
          f"(precision auto: {choose_precision('auto', trains_backbone=False).precision}; floor forward in "
          f"{'bf16' if rows[0]['bf16'] else 'float32'}"
          f"{'; --float32: the runs with strategy.bf16=false' if float32 else ''})")  # fmt: skip
    print(f"{'images':>7}{'floor s':>9}{'first run s':>13}{'/ floor':>9}{'cache hit s':>13}{'/ floor':>9}"
          f"{'start-up s':>12}{'test acc':>10}{'peak MB':>9}")  # fmt: skip
    for r in rows:
        shown = f"{r['startup']:.1f}" if r["startup"] is not None else "?"
        print(f"{r['images']:>7}{r['floor']:>9.1f}{r['first']:>13.1f}{r['first'] / r['floor']:>8.2f}x"
              f"{r['hit']:>13.1f}{r['hit'] / r['floor']:>8.2f}x{shown:>12}{r['acc'] or 0:>10.3f}"
              f"{r['memory']:>9.0f}")  # fmt: skip


# ------------------------------------------------------------------------------ frozen epochs


def frozen_epoch(data: Path, image_size: int, model: str, repeats: int) -> None:
    """One training epoch per strategy, timed from its start to its end by a callback."""
    import lightning as L
    import torch

    from transfer_learning.run.config import build, compose_config

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.seconds = time.perf_counter() - self.start
            trainer.should_stop = True  # epoch 0 only (gradual_unfreeze's frozen epoch)

    variants = {
        "feature_extract, no cache (baseline)": [
            "strategy=feature_extract",
            "strategy.cache_features=false",
            "strategy.bf16=false",
        ],
        "gradual_unfreeze, frozen epoch 0": ["strategy=gradual_unfreeze"],
        "finetune (everything trains)": ["strategy=finetune"],
    }
    best: dict[str, float] = {}
    rounds: list[dict[str, float]] = []
    for round_ in range(repeats):
        rounds.append({})
        for name, overrides in variants.items():
            cfg = compose_config([
                "data=imagefolder", f"data.root={data}", f"input.image_size={image_size}", f"model={model}",
                "trainer.max_epochs=2", "scheduler=constant", *overrides,
            ])  # fmt: skip
            datamodule, module = build(cfg)
            timer = EpochTimer()
            L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=[timer]).fit(module, datamodule)  # fmt: skip
            best[name] = min(best.get(name, float("inf")), timer.seconds)
            rounds[-1][name] = timer.seconds
            print(f"round {round_ + 1}: {name}: {timer.seconds:.2f} s", flush=True)
    images = len(datamodule.datasets["train"])  # type: ignore[arg-type]
    from transfer_learning.hardware import cpu_description

    print(f"\n{cpu_description()}, {torch.get_num_threads()} threads, {model}, "
          f"{image_size} px, {images} training images, fastest of {repeats}")  # fmt: skip
    print(f"{'one training epoch':<40}{'seconds':>9}{'vs baseline':>13}{'median of rounds':>18}")
    baseline = next(iter(best))
    for name, seconds in best.items():
        paired = statistics.median(r[name] / r[baseline] for r in rounds)  # same round, same load
        print(f"{name:<40}{seconds:>9.2f}{seconds / best[baseline]:>12.2f}x{paired:>17.2f}x")


# ------------------------------------------------------------------------------ timing harness


def timed(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """Wall seconds, peak resident memory (MB, the process and the children it waited for)
    and output of one whole process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROJECT_ROOT", None)
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{text[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, text


def template_result(text: str) -> dict[str, Any]:
    """Validation accuracy of a `train.py` run, from the summary and CSV files it names."""
    marker = next(line for line in text.splitlines() if line.strip().startswith("output dir"))
    run = Path(marker.split(maxsplit=2)[2])
    summary = read_json(run / "summary.json", fix="", limit=SUMMARY_LIMIT)
    vals = [
        float(row["val/acc"])
        for row in read_csv_records(run / "csv" / "metrics.csv")[1]
        if row.get("val/acc")
    ]
    train_images = int(summary["images train/val/test"].split("/")[0])
    return {"val_acc": vals[-1], "best_val_acc": summary["best val/acc"], "train_images": train_images}


def make_data(root: Path) -> Path:
    from transfer_learning.data.demo import generate_shapes

    generate_shapes(root / "train", images_per_class=60, image_size=160, seed=0)
    generate_shapes(root / "val", images_per_class=16, image_size=160, seed=1)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="efficientnet_lite0", help="a file of conf/model/")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data", type=Path, help="ImageFolder root with train/ and val/")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--frozen-epoch", action="store_true", help="time a gradual_unfreeze frozen epoch")
    parser.add_argument("--repeats", type=int, default=2, help="with --frozen-epoch")
    parser.add_argument("--floor", help="feature extraction against its floor at these numbers of images")
    parser.add_argument("--plain", choices=["feature_extract", "finetune"], help=argparse.SUPPRESS)
    parser.add_argument("--plain-bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--float32",
        action="store_true",
        help="with --floor: the floor and the features in float32, even where bf16 is native",
    )
    parser.add_argument("--floor-run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_run:
        print("RESULT " + json.dumps(floor_pass(args.floor_run, args.model, float32=args.float32)))
        return
    if args.floor:
        floor_benchmark([int(n) for n in args.floor.split(",")], args.model, args.float32)
        return
    data = (args.data or make_data(Path("data/benchmark_shapes"))).absolute()
    if args.frozen_epoch:
        frozen_epoch(data, args.image_size, args.model, args.repeats)
        return
    if args.plain:
        result = plain_loop(args.plain, data, args.epochs, args.image_size, args.model, args.plain_bf16)
        print("RESULT " + json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="benchmark-"))  # fresh logs and a cold feature cache
    python = sys.executable
    plain = [python, str(Path(__file__).resolve()), f"--data={data}", f"--epochs={args.epochs}",
             f"--image-size={args.image_size}", f"--model={args.model}", "--plain"]  # fmt: skip
    template = [python, str(REPO / "train.py"), "data=imagefolder", f"data.root={data}",
                f"model={args.model}", f"trainer.max_epochs={args.epochs}",
                f"input.image_size={args.image_size}"]  # fmt: skip
    runs = [
        ("(a) plain loop, feature extraction", [*plain, "feature_extract"], "plain"),
        ("(b) feature_extract, first run", [*template, "strategy=feature_extract"], "template"),
        ("(b) feature_extract, cache hit", [*template, "strategy=feature_extract"], "template"),
    ]
    from transfer_learning.hardware import cpu_has_bf16

    if not args.skip_finetune:
        runs.append(("(a) plain loop, fine-tuning", [*plain, "finetune"], "plain"))
        if cpu_has_bf16():  # the plain loop in its best precision on this CPU too
            runs.append(("(a) plain loop, fine-tuning, bf16", [*plain, "finetune", "--plain-bf16"], "plain"))
        runs.append(("(b) finetune, precision auto", [*template, "strategy=finetune"], "template"))
    rows = []
    for name, command, kind in runs:
        print(f"running {name} ...", flush=True)
        seconds, memory, text = timed(command, work)
        if kind == "plain":
            result = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
        else:
            result = template_result(text)
        rows.append({"name": name, "seconds": seconds, "memory": memory, **result})

    import torch

    from transfer_learning.hardware import choose_precision, cpu_description

    print(f"\n{cpu_description()}, torch {torch.__version__}, {args.model}, {args.image_size} px, "
          f"{count(args.epochs, 'epoch')}, {rows[0]['train_images']} training images; precision auto "
          f"for fine-tuning: {choose_precision('auto', crop_size=args.image_size).precision}")  # fmt: skip
    print(f"{'run':<38}{'wall s':>8}{'img/s':>8}{'val acc':>9}{'best':>7}{'peak MB':>9}{'vs (a)':>8}")
    baseline = {  # fine-tuning: the faster of the plain loop's float32 and bf16 runs
        "feature": rows[0]["seconds"],
        "fine": min((r["seconds"] for r in rows if "plain loop, fine" in r["name"]), default=0),
    }
    for r in rows:
        images_per_s = r["train_images"] * args.epochs / r["seconds"]
        base = baseline["feature" if "feature" in r["name"] else "fine"]
        ratio = f"{base / r['seconds']:.2f}x" if base and not r["name"].startswith("(a)") else ""
        print(f"{r['name']:<38}{r['seconds']:>8.1f}{images_per_s:>8.1f}{r['val_acc']:>9.3f}"
              f"{r['best_val_acc']:>7.3f}{r['memory']:>9.0f}{ratio:>8}")  # fmt: skip
    print(f"cache hit vs first run: {rows[1]['seconds'] / rows[2]['seconds']:.2f}x faster")
    if not args.skip_finetune:
        print(
            "fine-tuning 'vs (a)': against the faster plain-loop fine-tuning run"
            + (" (float32 or bf16 autocast)" if cpu_has_bf16() else " (float32: no native bf16 here)")
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
