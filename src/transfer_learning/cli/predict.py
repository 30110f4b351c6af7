"""``tl-predict`` and ``python -m transfer_learning.results.predict``: predict image files with a
trained checkpoint, ``tl-predict ckpt_path=CKPT images=PATH|[PATH,...] [output=preds.csv|.json]
[top_k=K] [batch_size=N] [device=auto|cpu|cuda] [threshold=P] [num_workers=N] [explain=DIR]``.

The command line is read here, without torch (``--help`` and mistakes answer at once); the work
is :func:`transfer_learning.results.predict.run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from transfer_learning.cli.options import (
    REQUIRED,
    Command,
    Option,
    integer,
    module_doc,
    number,
    path,
    text,
    wants_help,
)

OUTPUT_FORMATS = (".csv", ".json")
IMAGES_HELP = "image files, folders or glob patterns: one, or a list [photos,'scans/*.jpg']"
THRESHOLD_HELP = "mark images whose top probability is below P as uncertain (0: none)"
THRESHOLD_DEFAULT = "the value in <checkpoint stem>.threshold.json next to the checkpoint, if any"
AUTO_WORKERS = "auto: none for a few batches, else up to 4"
EXPLAIN_HELP = (
    "also write, per image, a Grad-CAM overlay <name>.gradcam.png and the heatmap <name>.gradcam.npy "
    "(0..1, the image's own height x width) into DIR"
)
COMMAND = Command(
    prog="tl-predict",
    summary="\n\n".join(  # results/predict/__init__.py's doc, less its usage line and the Python part
        part
        for part in module_doc("results/predict/__init__.py").split("\n\nIn Python")[0].split("\n\n")
        if not part.startswith("Usage")
    ),
    options=(
        Option("ckpt_path", path("CKPT"), "a checkpoint written by train.py", REQUIRED),
        Option("images", text("PATHS"), IMAGES_HELP, REQUIRED, many=True),
        Option("output", path("FILE", OUTPUT_FORMATS), "also write the results to a .csv or .json file"),
        Option("top_k", integer(1, "K"), "classes per image", 1),
        Option("batch_size", integer(1), "images per batch", 32),
        Option("device", text("DEVICE"), "auto (the GPU when there is one), cpu, cuda, cuda:N", "auto"),
        Option("threshold", number(0, 1, "P"), THRESHOLD_HELP, shown=THRESHOLD_DEFAULT),
        Option("num_workers", integer(0), "image decoding processes", shown=AUTO_WORKERS),
        Option("explain", path("DIR"), EXPLAIN_HELP),
    ),
    positional=("ckpt_path", "images"),
    aliases={"o": "output"},
    epilog="Exit status: 0 all predicted, 1 some inputs skipped (listed on stderr), 2 usage error.\n"
    "Also: python -m transfer_learning.results.predict key=value ...",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The ``key=value`` command line (:data:`COMMAND`): ``--help`` prints the options and
    exits 0, a mistake prints one line and exits 2."""
    values = COMMAND.parse_or_exit(argv)
    return argparse.Namespace(checkpoint=values.pop("ckpt_path"), paths=values.pop("images"), **values)


def main(argv: Sequence[str] | None = None) -> int:
    """The command; returns its exit status (0 all predicted, 1 some inputs skipped, 2 a usage
    error). ``--help`` and a mistake in the command line answer before torch loads."""
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(COMMAND.usage())
        return 0
    args = parse_args(argv)
    from transfer_learning.results.predict import run

    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
