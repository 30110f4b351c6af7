"""Writing the predictions: one line per image on the terminal, the CSV and JSON output files
(:func:`prediction_record`, also the server's answers), and the hand-off to the Grad-CAM
explanations."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transfer_learning.escaping import csv_dict, visible
from transfer_learning.results.predict.classifier import Classifier, Prediction
from transfer_learning.results.predict.inputs import BadInput


def _number(p: float) -> float:
    """A float32 probability with the 9 significant digits that keep it exact."""
    return float(f"{p:.9g}")


def terminal_line(prediction: Prediction, threshold: float | None) -> str:
    """``path  label  probability  [other top-k]  [UNCERTAIN]``, tab separated, on one line:
    tabs, newlines and other control characters in names are written as escapes (``\\t``)."""
    if prediction.multilabel:  # the label set, then every class's probability
        chosen = " ".join(visible(n) for n in prediction.labels or []) or "(no label)"
        every = ", ".join(f"{visible(n)} {p:.3f}" for n, p in prediction.probabilities.items())
        return "\t".join([visible(prediction.source), chosen, every])
    fields = [visible(prediction.source), visible(prediction.label), f"{prediction.score:.3f}"]
    if len(prediction.top_k) > 1:
        fields.append("then " + ", ".join(f"{visible(n)} {p:.3f}" for n, p in prediction.top_k[1:]))
    if prediction.uncertain:
        fields.append(f"UNCERTAIN (top probability < {threshold:.3f})")
    return "\t".join(fields)


def csv_columns(class_names: Sequence[str], top_k: int, multilabel: bool = False) -> list[str]:
    if multilabel:  # the label set (names joined by a space), every probability
        return ["file", "predicted", *(f"prob_{n}" for n in class_names), "error"]
    ranks = [f"top{r}_{part}" for r in range(1, top_k + 1) for part in ("class", "prob")]
    return ["file", "predicted", "score", "uncertain", *ranks, *(f"prob_{n}" for n in class_names), "error"]


def write_csv(path: Path, predictions: Sequence[Prediction], bad: Sequence[BadInput],
              class_names: Sequence[str], top_k: int, multilabel: bool = False) -> None:  # fmt: skip
    """One row per image; then one row per skipped input, with only ``file`` and ``error``. Text
    cells that a spreadsheet would run as a formula get a leading ``'`` (:func:`csv_dict`)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=csv_columns(class_names, top_k, multilabel))
        writer.writeheader()
        for p in predictions:
            if p.multilabel:
                cells = {"file": p.source, "predicted": p.label, "error": ""}
                writer.writerow(
                    csv_dict({**cells, **{f"prob_{n}": f"{v:.9g}" for n, v in p.probabilities.items()}})
                )
                continue
            row: dict[str, Any] = {"file": p.source, "predicted": p.label, "score": f"{p.score:.9g}",
                                   "uncertain": str(p.uncertain).lower(), "error": ""}  # fmt: skip
            for rank, (name, prob) in enumerate(p.top_k, start=1):
                row[f"top{rank}_class"], row[f"top{rank}_prob"] = name, f"{prob:.9g}"
            row.update({f"prob_{n}": f"{v:.9g}" for n, v in p.probabilities.items()})
            writer.writerow(csv_dict(row))
        for b in bad:
            writer.writerow(csv_dict({"file": b.source, "error": b.reason}))


def prediction_record(p: Prediction) -> dict[str, Any]:
    """One prediction as JSON (the output file's entries, the server's answers): ``file``,
    ``predicted`` (the class; multi-label: the label set), ``score``, ``uncertain``, ``top_k``
    and every class's probability (multi-label: ``predicted`` and ``probabilities`` only)."""
    probabilities = {n: _number(v) for n, v in p.probabilities.items()}
    if p.multilabel:
        return {"file": p.source, "predicted": p.labels, "probabilities": probabilities}
    return {
        "file": p.source,
        "predicted": p.label,
        "score": _number(p.score),
        "uncertain": p.uncertain,
        "top_k": [{"class": n, "prob": _number(v)} for n, v in p.top_k],
        "probabilities": probabilities,
    }


def write_json(path: Path, predictions: Sequence[Prediction], bad: Sequence[BadInput],
               header: dict[str, Any]) -> None:  # fmt: skip
    data = {
        **header,
        "predictions": [prediction_record(p) for p in predictions],
        "errors": [{"file": b.source, "error": b.reason} for b in bad],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_output(
    path: Path,
    checkpoint: Path,
    classifier: Classifier,
    predictions: Sequence[Prediction],
    bad: Sequence[BadInput],
    top_k: int,
    threshold: float | None,
) -> None:
    """The output file, its folder made first: CSV when ``path`` ends in ``.csv``
    (:func:`write_csv`), else JSON (:func:`write_json`) headed by the checkpoint, its classes, the
    confidence ``threshold``, ``top_k``, the task and (multi-label) the classes' thresholds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        write_csv(path, predictions, bad, classifier.class_names, top_k, classifier.multilabel)
    else:
        header: dict[str, Any] = {
            "checkpoint": str(checkpoint),
            "classes": classifier.class_names,
            "threshold": threshold,
            "top_k": top_k,
            "task": classifier.module.task,
        }
        if classifier.module.thresholds is not None:
            header["thresholds"] = [float(t) for t in classifier.module.thresholds]
        write_json(path, predictions, bad, header)


def write_explanations(
    classifier: Classifier, predictions: Sequence[Prediction], folder: Path, batch_size: int
) -> list[tuple[str, Path, Path]]:
    """The Grad-CAM of each prediction in ``folder``, with a progress bar
    (:func:`transfer_learning.results.explain.explain_predictions`): (source, png, npy) per image."""
    # Imported only when explanations are asked for: Grad-CAM's code (and Captum) stay unloaded.
    from transfer_learning.results.explain import explain_predictions

    return explain_predictions(classifier.module, predictions, folder, batch_size, True)
