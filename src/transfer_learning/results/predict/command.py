"""The ``tl-predict`` command, its arguments read (:mod:`transfer_learning.cli.predict`): the
checkpoint checked, the inputs found, predicted and written, a summary and the exit status."""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from transfer_learning.errors import TransferLearningError, user_message
from transfer_learning.escaping import visible
from transfer_learning.results.predict.classifier import Classifier
from transfer_learning.results.predict.inputs import expand_paths
from transfer_learning.results.predict.outputs import terminal_line, write_explanations, write_output


def auto_workers(n_files: int, batch_size: int) -> int:
    if n_files <= 2 * batch_size:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def checkpoint_problem(checkpoint: Path, paths: Sequence[str | Path] = ()) -> str | None:
    """Why ``checkpoint`` cannot be a checkpoint (missing, a folder, not a PyTorch archive; with
    ``paths``, the images named, whether the two look swapped), or None."""
    if not checkpoint.is_file():
        swapped = [str(p) for p in paths if str(p).endswith(".ckpt") and Path(p).is_file()]
        if checkpoint.is_dir() or swapped:
            what = "a folder" if checkpoint.is_dir() else "not a file"
            hint = (
                f": ckpt_path and images look swapped; write ckpt_path={swapped[0]} images={checkpoint}"
                if swapped
                else ": give a checkpoint file (.../checkpoints/best-epochNN.ckpt) as ckpt_path"
                + (", the images as images=" if paths else "")
            )
            return f"ckpt_path={checkpoint} is {what}, not a checkpoint{hint}"
        return (
            f"checkpoint {checkpoint} does not exist (train.py writes them to "
            "logs/train/runs/<date>/checkpoints/)."
        )
    if not zipfile.is_zipfile(checkpoint):
        return (
            f"cannot read checkpoint {checkpoint}: not a complete PyTorch archive "
            "(a truncated copy, or another kind of file)."
        )
    return None


def run(args: argparse.Namespace) -> int:
    """The command, its arguments read (:func:`transfer_learning.cli.predict.parse_args`);
    returns its exit status."""
    problem = checkpoint_problem(args.checkpoint, args.paths)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        classifier = Classifier.from_checkpoint(
            args.checkpoint,
            device=args.device,
            threshold="auto" if args.threshold is None else args.threshold,
        )
        files, bad, listing = expand_paths(args.paths)
        for note in listing.notes():
            print(f"note: {note}", file=sys.stderr)
        workers = (
            args.num_workers if args.num_workers is not None else auto_workers(len(files), args.batch_size)
        )
        predictions, failed = classifier.predict_listed(files, args.batch_size, args.top_k, workers, True)
    except TransferLearningError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    bad += failed
    threshold = classifier.threshold if classifier.threshold else None
    for prediction in predictions:
        print(terminal_line(prediction, threshold), flush=False)
    sys.stdout.flush()
    for b in bad:
        print(f"error: {visible(b.message())}", file=sys.stderr)
    if args.output is not None:
        k = min(args.top_k, len(classifier.class_names))
        try:
            write_output(args.output, args.checkpoint, classifier, predictions, bad, k, threshold)
        except OSError as exc:
            print(f"error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    uncertain = sum(p.uncertain for p in predictions)
    summary = f"{len(predictions)} image(s) predicted on {classifier.device.type}"
    if threshold is not None:
        origin = f", from {classifier.threshold_from}" if classifier.threshold_from != "given" else ""
        summary += f", {uncertain} uncertain (top probability < {threshold:.3f}{origin})"
    if bad:
        summary += f", {len(bad)} input(s) skipped"
    if args.output is not None:
        summary += f"; wrote {args.output}"
    if args.explain is not None and predictions:
        try:
            written = write_explanations(classifier, predictions, args.explain, args.batch_size)
        except (OSError, TransferLearningError) as exc:  # an image changed since, a folder not writable
            print(f"error: cannot write the explanations to {args.explain}: {exc}", file=sys.stderr)
            return 2
        summary += f"; Grad-CAM of {len(written)} image(s) in {args.explain}"
    print(summary, file=sys.stderr)
    return 1 if bad or not predictions else 0
