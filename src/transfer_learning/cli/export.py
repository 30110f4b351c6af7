"""``tl-export`` and ``python scripts/export.py``: export a checkpoint to ONNX or TorchScript and
check the file against PyTorch, ``tl-export ckpt_path=CKPT [format=onnx|torchscript]
[output=PATH] [images=PATH|[PATH,...]] [max_images=N] [atol=X]``.

The command line is read here, without torch (``--help`` and mistakes answer at once); the work
is :func:`transfer_learning.results.export.export`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from transfer_learning.cli import options as cli
from transfer_learning.results.export_args import (
    DEFAULT_ATOL,
    DEFAULT_MAX_IMAGES,
    DEMO_IMAGES,
    FORMATS,
    ExportArgs,
)

OUTPUT_DEFAULT = "next to the checkpoint, <ckpt stem>" + " or <ckpt stem>".join(FORMATS.values())
IMAGES_HELP = "image files or folders for the parity check: one, or a list [a.jpg,photos]"
IMAGES_DEFAULT = f"{DEMO_IMAGES} under $PROJECT_ROOT or here, if it exists"
COMMAND = cli.Command(
    prog="tl-export",
    summary=cli.module_doc("results/export.py", skip=2),  # less the title and the usage line
    options=(
        cli.Option("ckpt_path", cli.path("CKPT"), "the checkpoint to export", cli.REQUIRED),
        cli.Option("format", cli.choice(*FORMATS), "the file format", "onnx"),
        cli.Option("output", cli.path(), "where to write the model", shown=OUTPUT_DEFAULT),
        cli.Option("images", cli.text("PATHS"), IMAGES_HELP, (), many=True, shown=IMAGES_DEFAULT),
        cli.Option("max_images", cli.integer(2), "images in the check's batch of N", DEFAULT_MAX_IMAGES),
        cli.Option("atol", cli.number(0), "the largest difference of logits the check accepts", DEFAULT_ATOL),
    ),
    positional=("ckpt_path",),
    epilog="Exit status: 0 exported and checked, 1 the parity check failed, 2 usage error.\n"
    "Also: python scripts/export.py key=value ...",
)


def usage() -> str:
    return COMMAND.usage()


def export_args(values: dict[str, Any]) -> ExportArgs:
    return ExportArgs(**{**values, "images": tuple(values["images"])})


def parse_args(argv: Sequence[str]) -> ExportArgs:
    """The ``key=value`` command line (:data:`COMMAND`), as train.py takes it; raises
    :class:`~transfer_learning.cli.options.UsageError` (a ConfigError) for a mistake."""
    return export_args(COMMAND.parse(argv))


def main(argv: Sequence[str] | None = None) -> None:
    """The command: ``--help`` or a mistake (one line on stderr, exit status 2) answer before
    torch loads; then :func:`transfer_learning.results.export.run` (exit status 0 exported and
    checked, 1 the parity check failed, 2 a usage error)."""
    argv = sys.argv[1:] if argv is None else argv
    if cli.wants_help(argv):
        print(usage())
        return
    args = export_args(COMMAND.parse_or_exit(argv))
    from transfer_learning.results.export import run

    run(args)


if __name__ == "__main__":
    main()
