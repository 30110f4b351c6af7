"""Feature extraction and fine-tuning on a GPU at 32, 16-mixed and bf16-mixed precision.

`python scripts/gpu_check.py --data DIR` trains the default backbone on DIR (generated demo
shapes if missing) for a few epochs per setting and prints one table: validation accuracy,
seconds per epoch (relative to 32-bit in the same process), and whether the frozen backbone stayed
bit-identical. With 2 or more GPUs (or --ddp yes) it also trains each strategy with DDP on
two devices through `python train.py trainer=ddp trainer.devices=2` and checks the effective
batch, the metrics and, for feature extraction, that the saved backbone is the pretrained one.
Then it measures the floor on that device (one decode + one channels_last forward pass over the
images, bf16 where native: `scripts/benchmark.py --floor`'s, in this process) and prints images/s
of the floor and of each run's mean training epoch (fine-tuning's against the floor; feature
extraction's trains a head on cached features), and whether decoding JPEGs keeps up:
PIL on `--workers` CPU processes against `torchvision.io.decode_jpeg(device="cuda")` in batches,
and against the forward pass. GPU decoding pays only when the CPU decode rate is below the
forward rate.
Not a test: it needs a GPU, which the test suite never does.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transfer_learning.readers import SUMMARY_LIMIT, read_checkpoint, read_json

# torch, Lightning and the package load inside the functions: `--help` answers at once.

STRATEGIES = ("feature_extract", "finetune")


def run(data: str, strategy: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch

    from transfer_learning.run.config import build, compose_config

    L.seed_everything(0, workers=True)
    cfg = compose_config(
        [
            "data=imagefolder",
            f"data.root={data}",
            f"input.image_size={args.image_size}",
            f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}",
            f"strategy={strategy}",
        ]
    )
    datamodule, module = build(cfg)
    backbone_before = copy.deepcopy(module.net.backbone.state_dict())
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=precision,  # type: ignore[arg-type]
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    seconds = (time.perf_counter() - start) / args.epochs
    backbone_after = module.net.backbone.state_dict()
    unchanged = all(torch.equal(backbone_before[k], v.cpu()) for k, v in backbone_after.items())
    return {
        "strategy": strategy,
        "precision": precision,
        "val_acc": float(trainer.callback_metrics["val/acc"]),
        "s_per_epoch": seconds,
        "backbone_unchanged": unchanged,
        "params_fp32": all(p.dtype == torch.float32 for p in module.parameters()),
    }


ROOT = Path(__file__).resolve().parents[1]


def run_ddp(data: str, strategy: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    """One DDP run on two devices through the real command line (Lightning starts the second
    process by re-running it), in a temporary folder; returns what its summary says."""
    import torch

    from transfer_learning.model.backbones import efficientnet_lite0

    trainer = "trainer=ddp" if args.accelerator == "gpu" else "trainer=ddp_cpu"
    with tempfile.TemporaryDirectory() as work:
        command = [
            sys.executable, str(ROOT / "train.py"), trainer, "trainer.devices=2",
            f"trainer.precision={precision}", f"trainer.max_epochs={args.epochs}", f"strategy={strategy}",
            "data=imagefolder", f"data.root={Path(data).resolve()}", f"input.image_size={args.image_size}",
            f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}", "logger=csv",
            f"hydra.run.dir={work}/run", "worst_samples=0",
        ]  # fmt: skip
        start = time.perf_counter()
        result = subprocess.run(command, cwd=work, capture_output=True, text=True, env={**os.environ})
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            return {"strategy": strategy, "precision": precision, "error": result.stderr[-1500:]}
        summary = read_json(Path(work) / "run" / "summary.json", fix="", limit=SUMMARY_LIMIT)
        saved = read_checkpoint(summary["best checkpoint"])["state_dict"]
        pretrained = efficientnet_lite0(num_classes=2).backbone.state_dict()
        unchanged = all(torch.equal(saved[f"net.backbone.{k}"], v) for k, v in pretrained.items())
        return {
            "strategy": strategy,
            "precision": precision,
            "batch": summary["batch size"],
            "val_acc": summary["best val/acc"],
            "test_acc": summary["test/acc"],
            "seconds": seconds,
            "backbone_unchanged": unchanged,
            "fp32": all(v.dtype == torch.float32 for v in saved.values() if v.is_floating_point()),
        }


def decode_rates(images: list[Path], workers: int, limit: int = 512) -> dict[str, float | None]:
    """Images/s decoding the JPEGs among ``images`` (at most ``limit``): PIL on ``workers``
    processes, and torchvision's nvjpeg decoder on the GPU in batches of 64 (None without one)."""
    import concurrent.futures

    import torch
    from torchvision.io import decode_jpeg, read_file

    files = [str(p) for p in images if p.suffix.lower() in (".jpg", ".jpeg")][:limit]
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(_pil_decode, files, chunksize=16))
    rates: dict[str, float | None] = {"pil": len(files) / (time.perf_counter() - start), "gpu": None}
    if torch.cuda.is_available():
        raw = [read_file(f) for f in files]  # the bytes, as the loader would hand them over
        decode_jpeg(raw[:8], device="cuda")  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(raw), 64):
            decode_jpeg(raw[i : i + 64], device="cuda")
        torch.cuda.synchronize()
        rates["gpu"] = len(files) / (time.perf_counter() - start)
    return rates


def _pil_decode(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        image.convert("RGB")
        return image.size


def floor_rate(data: str, image_size: int) -> tuple[float, bool]:
    """Images/s of the floor's decode + forward pass at ``image_size`` in this process (imports
    excluded), and whether it ran in bf16."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark import floor_pass

    start = time.perf_counter()
    result = floor_pass(Path(data), "efficientnet_lite0", image_size)
    return result["images"] / (time.perf_counter() - start), result["bf16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="data/demo_shapes")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precisions", nargs="+", default=["32", "16-mixed", "bf16-mixed"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--ddp", choices=("auto", "yes", "no"), default="auto", help="auto: with 2+ GPUs")
    args = parser.parse_args()
    import torch

    from transfer_learning.data.demo import generate_shapes

    generate_shapes(args.data, images_per_class=200, image_size=128)
    if args.accelerator == "gpu":
        print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    if args.ddp == "yes" or (args.ddp == "auto" and torch.cuda.device_count() >= 2):
        ddp_main(args)
        if args.ddp == "yes" and args.accelerator != "gpu":
            return
    from transfer_learning.hardware import choose_precision

    auto = choose_precision("auto", args.accelerator, crop_size=args.image_size)
    print(
        f"trainer.precision=auto here, fine-tuning at {args.image_size} px: {auto.precision} ({auto.reason})"
    )
    rows = [run(args.data, s, p, args) for s in STRATEGIES for p in args.precisions]
    print(
        f"\n{'strategy':<16} {'precision':<11} {'val/acc':>7} {'s/epoch':>8} {'vs 32':>6}  "
        "backbone unchanged  fp32 params"
    )
    for r in rows:
        base = next(b for b in rows if b["strategy"] == r["strategy"])["s_per_epoch"]
        print(
            f"{r['strategy']:<16} {r['precision']:<11} {r['val_acc']:>7.3f} {r['s_per_epoch']:>8.2f} "
            f"{r['s_per_epoch'] / base:>6.2f}  {r['backbone_unchanged']!s:<18}  {r['params_fp32']}"
        )
    floor, bf16 = floor_rate(args.data, args.image_size)
    from transfer_learning.data.images import list_images

    images = list_images(Path(args.data)).files
    train_images = round(len(images) * 0.7)  # the default split: 15% val, 15% test
    print(f"\nimages/s on this device at {args.image_size} px (floor: one decode + forward pass, "
          f"{'bf16' if bf16 else 'float32'}):")  # fmt: skip
    print(f"  {'floor':<44}{floor:>8.1f}")
    for r in rows:
        rate = train_images / r["s_per_epoch"]
        name = f"{r['strategy']}, {r['precision']}, mean training epoch"
        # Feature extraction's epochs train a head on cached features: no forward pass to compare.
        against = (
            f"{rate / floor:.2f}x floor"
            if r["strategy"] != "feature_extract"
            else "(head on cached features)"
        )
        print(f"  {name:<44}{rate:>8.1f}  {against}")
    rates = decode_rates(images, args.workers)
    pil = float(rates["pil"] or 0.0)
    gpu = f"{rates['gpu']:.1f}" if rates["gpu"] is not None else "(no GPU)"
    print(f"  {f'JPEG decode, PIL on {args.workers} CPU processes':<44}{pil:>8.1f}")
    print(f"  {'JPEG decode, nvjpeg on the GPU':<44}{gpu:>8}")
    bound = pil < floor
    print(f"  the loader {'limits' if bound else 'keeps up with'} the forward pass"
          f"{': decode on the GPU for the cache build' if bound and rates['gpu'] else ''}")  # fmt: skip


def ddp_main(args: argparse.Namespace) -> None:
    rows = [run_ddp(args.data, s, p, args) for s in STRATEGIES for p in args.precisions]
    header = f"{'strategy':<16} {'precision':<11} {'batch':<32} {'val/acc':>7} {'test/acc':>8} {'wall s':>7}"
    print(f"\nDDP, 2 devices\n{header}  backbone unchanged  fp32 weights")
    for r in rows:
        if "error" in r:
            print(f"{r['strategy']:<16} {r['precision']:<11} FAILED\n{r['error']}")
            continue
        print(
            f"{r['strategy']:<16} {r['precision']:<11} {r['batch']:<32} {r['val_acc']:>7.3f} "
            f"{r['test_acc']:>8.3f} {r['seconds']:>7.1f}  {r['backbone_unchanged']!s:<18}  {r['fp32']}"
        )


if __name__ == "__main__":
    main()
