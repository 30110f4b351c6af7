"""The model card of a run: ``MODEL_CARD.md`` (to read) and ``model_card.json`` (what
``tl-serve`` answers in ``GET /info``) in the run folder, written after testing from what the run
knows (its config, data, summary and calibration), never by hand.

Sections: the model (backbone, pretraining), the strategy, the data (source, images per split,
classes and their training counts, imbalance, the data checks' warnings: leakage, one image
under two labels, files left out), the test metrics with their 95 % intervals, calibration,
known limits, how to reproduce it (the command and the config files) and the files.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transfer_learning.escaping import markdown_cell, visible
from transfer_learning.readers import read_json

MARKDOWN, JSON = "MODEL_CARD.md", "model_card.json"
OOD = (
    "Out of distribution: images unlike the training data (other cameras, lighting, subjects, classes "
    "it never saw) can get confident wrong answers; the uncertain flag catches some of them, not all."
)
FILES = {
    "summary": "summary.json", "report": "report.md", "config": ".hydra/config.yaml",
    "resolved config": "run_config.yaml", "test predictions": "test_predictions.json",
    "per-class metrics": "per_class_metrics.csv", "confusion matrix": "confusion_matrix.png",
    "reliability diagram": "reliability_diagram.png", "log": "train.log",
}  # fmt: skip


def _plain(value: Any) -> Any:
    """Numbers, strings, booleans and None as they are; anything else as text."""
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _metrics(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``test/<metric>``: the value and, where the run computed one, its 95 % interval."""
    metrics: dict[str, dict[str, Any]] = {}
    for key, value in summary.items():
        if not key.startswith("test/") or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if "_ci95_" in key or key.endswith("_uncalibrated"):
            continue
        entry: dict[str, Any] = {"value": float(value)}
        low, high = summary.get(f"{key}_ci95_low"), summary.get(f"{key}_ci95_high")
        if low is not None and high is not None:
            entry["interval_95"] = [float(low), float(high)]
            entry["interval"] = str(summary.get(f"{key} 95 %", ""))
        metrics[key] = entry
    return metrics


def build_card(
    summary: Mapping[str, Any],
    module: Any,
    split_sizes: Mapping[str, int],
    train_counts: Sequence[int],
    warnings: Sequence[str],
    left_out: Mapping[str, int],
    overrides: Sequence[str],
    strategy: Mapping[str, Any],
    files: Mapping[str, str],
    weights: Any = None,
) -> dict[str, Any]:
    """The card as JSON-ready data; :func:`markdown` renders it."""
    names = list(module.class_names)
    multilabel = module.task == "multilabel"
    counts = dict(zip(names, (int(c) for c in train_counts), strict=False))
    smallest, largest = (min(counts.values()), max(counts.values())) if counts else (0, 0)
    imbalance = largest / smallest if smallest else None
    test_images = split_sizes.get("test", 0)
    limits = [
        "Uncertain flag: tl-predict and tl-serve mark an image uncertain when its top probability is below "
        "the threshold in <checkpoint stem>.threshold.json, which `python eval.py ckpt_path=...` writes from "
        "the validation images; without that file nothing is flagged."
        if not multilabel
        else "Multi-label: each class is called when its sigmoid probability reaches its own threshold "
        "(fitted on the validation images); there is no uncertain flag.",
        OOD,
        f"The test numbers come from {test_images} image(s): their intervals say how far off they may be.",
    ]
    if imbalance is not None and imbalance >= 3:
        limits.append(
            f"Imbalanced training data (largest class {imbalance:.1f}x the smallest): the smaller "
            "classes are predicted less reliably (see the per-class metrics)."
        )
    if smallest and smallest < 30:
        limits.append(f"Small data: the smallest class has {smallest} training image(s).")
    model = str(summary.get("model", ""))
    return {
        "title": f"{model} ({summary.get('strategy', '')}), {len(names)} classes",
        "model": {
            "backbone": model,
            "pretrained": _plain(summary.get("pretrained backbone")),
            "weights": _plain(weights),
            "parameters": _plain(summary.get("parameters")),
            "input_size": module.preprocessing.crop_size,
            "preprocessing": module.preprocessing.to_dict(),
        },
        "strategy": {
            "name": _plain(summary.get("strategy")),
            **{k: _plain(v) for k, v in strategy.items() if not k.startswith("_")},
        },
        "training": {
            k: _plain(summary.get(k)) for k in ("epochs run", "precision", "batch size", "weight averaging")
        },
        "data": {
            "source": _plain(summary.get("data")),
            "task": module.task,
            "classes": names,
            "images_per_split": dict(split_sizes),
            "train_images_per_class": counts,
            "imbalance_ratio": imbalance,
            "checks": list(warnings) or ["no leakage, label conflicts or imbalance found"],
            "left_out": dict(left_out),
        },
        "test_metrics": _metrics(summary),
        "calibration": {
            "temperature": float(module.temperature),
            "fitted": _plain(summary.get("calibration")),
            "on_test": _plain(summary.get("calibration on test")),
            **(
                {"thresholds": dict(zip(names, (float(t) for t in module.thresholds), strict=True))}
                if module.thresholds is not None
                else {}
            ),
        },
        "limits": limits,
        "reproduce": {
            "command": " ".join(["python", "train.py", *(shlex.quote(o) for o in overrides)]),
            "config": ".hydra/config.yaml",
            "resolved_config": "run_config.yaml",
        },
        "files": dict(files),
    }


def _rows(pairs: Mapping[str, Any]) -> list[str]:
    return [
        "|  |  |",
        "|---|---|",
        *(f"| {markdown_cell(k)} | {markdown_cell(v)} |" for k, v in pairs.items()),
    ]


def markdown(card: Mapping[str, Any]) -> str:
    """``MODEL_CARD.md``: the card's sections as Markdown."""
    data, cal, how = card["data"], card["calibration"], card["reproduce"]
    ratio = data["imbalance_ratio"]
    facts = {
        "source": data["source"],
        "task": data["task"],
        "images per split": ", ".join(f"{k} {v}" for k, v in data["images_per_split"].items()),
        "imbalance (largest / smallest class)": "n/a" if ratio is None else f"{ratio:.2f}",
    }
    lines = [f"# Model card: {visible(card['title'])}", "",
             "_Written by the run from its own config, data and results._", ""]  # fmt: skip
    lines += ["## Model", "", *_rows({k: v for k, v in card["model"].items() if k != "preprocessing"}), ""]
    lines += ["## Strategy", "", *_rows(card["strategy"]), "", *_rows(card["training"]), ""]
    lines += ["## Data", "", *_rows(facts), "", "| class | training images |", "|---|---|"]
    lines += [f"| {markdown_cell(n)} | {c} |" for n, c in data["train_images_per_class"].items()]
    lines += ["", "Data checks (leakage between splits, one image under two labels, imbalance):", ""]
    lines += [f"- {visible(w)}" for w in data["checks"]]
    lines += [f"- left out: {visible(k)}: {v}" for k, v in data["left_out"].items()]
    lines += ["", "## Test metrics", "", "| metric | value | 95 % interval |", "|---|---|---|"]
    for name, metric in card["test_metrics"].items():
        lines.append(
            f"| {markdown_cell(name)} | {metric['value']:.4f} | {markdown_cell(metric.get('interval', ''))} |"
        )
    lines += ["", "## Calibration", ""]
    notes = [f"- {visible(cal[k])}" for k in ("fitted", "on_test") if cal.get(k)]
    lines += notes or [f"- temperature {cal['temperature']:.4g}"]
    if cal.get("thresholds"):
        shown = ", ".join(f"{visible(n)} {t:.3f}" for n, t in cal["thresholds"].items())
        lines.append(f"- thresholds: {shown}")
    lines += ["", "## Known limits", "", *(f"- {visible(x)}" for x in card["limits"]), ""]
    lines += ["## Reproduce", "", "```bash", visible(how["command"]), "```", ""]
    lines += [f"The config: `{how['config']}`, resolved: `{how['resolved_config']}`.", "", "## Files", ""]
    lines += [f"- {markdown_cell(k)}: `{visible(v)}`" for k, v in card["files"].items()]
    return "\n".join([*lines, ""])


def write_card(folder: Path, card: Mapping[str, Any]) -> Path:
    """``MODEL_CARD.md`` and ``model_card.json`` in ``folder``; returns the Markdown's path."""
    (folder / JSON).write_text(json.dumps(card, indent=2) + "\n")
    path = folder / MARKDOWN
    path.write_text(markdown(card))
    return path


def card_for_checkpoint(checkpoint: Path, module: Any) -> dict[str, Any]:
    """The card of the run a checkpoint comes from (``<run>/model_card.json`` above its
    ``checkpoints/`` folder), read as data; a checkpoint without one gets what it carries."""
    for folder in (checkpoint.parent.parent, checkpoint.parent):
        path = folder / JSON
        if path.is_file():
            card = read_json(path, fix="It is written by train.py; delete it or train again.")
            if isinstance(card, dict):
                return card
    return {
        "title": f"{checkpoint.name} (no {JSON} in its run folder: the checkpoint's own facts only)",
        "model": {
            "input_size": module.preprocessing.crop_size,
            "preprocessing": module.preprocessing.to_dict(),
        },
        "data": {"task": module.task, "classes": list(module.class_names)},
        "calibration": {"temperature": float(module.temperature)},
        "limits": [OOD],
    }
