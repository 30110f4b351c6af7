"""``tl-serve`` and ``python -m transfer_learning.serve``: serve a trained checkpoint over HTTP,
``tl-serve ckpt_path=CKPT [host=127.0.0.1] [port=8000] [device=auto] [backend=pytorch|onnx]
[max_batch_size=N] [workers=N] [batch_timeout=S] [max_queue=N] [max_upload_mb=MB] [max_images=N] [top_k=K]
[threshold=P]``.

The command line is read here, without torch (``--help`` and mistakes answer at once); the work
is :func:`transfer_learning.serve.server.run`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from transfer_learning.cli import options as cli

SUMMARY = """Serve a checkpoint: POST /predict (images in; per image the top-k classes with calibrated
probabilities and the uncertain flag, multi-label: the label set; explain=true adds the Grad-CAM
overlay), GET /health, GET /info (classes, preprocessing, calibration, the model card) and a web
page at / to try it in a browser.

Images of concurrent requests are batched (up to max_batch_size, waiting at most batch_timeout
seconds for more; workers batches at once); at most max_queue requests are in flight, one more
gets 503 with Retry-After. Every bad input gets a 4xx with one JSON error. SIGTERM (or
Ctrl-C): stop accepting, answer the requests in flight, exit 0.

It listens on 127.0.0.1 (this machine only) unless host= says otherwise: for other machines,
put a reverse proxy with TLS and authentication in front of it (docs/serving.md)."""

COMMAND = cli.Command(
    prog="tl-serve",
    summary=SUMMARY,
    options=(
        cli.Option("ckpt_path", cli.path("CKPT"), "a checkpoint written by train.py", cli.REQUIRED),
        cli.Option(
            "host", cli.text("HOST"), "the address to listen on (0.0.0.0: every interface)", "127.0.0.1"
        ),
        cli.Option("port", cli.integer(0, "PORT"), "the TCP port (0: any free port, printed at start)", 8000),
        cli.Option(
            "device", cli.text("DEVICE"), "auto (the GPU when there is one), cpu, cuda, cuda:N", "auto"
        ),
        cli.Option(
            "backend",
            cli.choice("pytorch", "onnx"),
            "run the network in PyTorch or ONNX Runtime "
            "(<ckpt stem>.onnx from tl-export when it exists, else exported at start)",
            "pytorch",
        ),
        cli.Option("max_batch_size", cli.integer(1), "images per batch through the network", 16),
        cli.Option(
            "workers",
            cli.integer(1),
            "batches run at once, each on its share of the CPU threads",
            shown="auto: on a CPU min(4, threads), sharing the threads; on a GPU 1",
        ),
        cli.Option("batch_timeout", cli.number(0, 10, "S"), "seconds a batch waits for more images", 0.005),
        cli.Option("max_queue", cli.integer(1), "requests in flight before 503 + Retry-After", 64),
        cli.Option("max_upload_mb", cli.number(0.001, None, "MB"), "largest request body", 10.0),
        cli.Option("max_images", cli.integer(1), "images per request", 16),
        cli.Option("max_pixels", cli.integer(1), "largest image (width x height) decoded", 40_000_000),
        cli.Option("top_k", cli.integer(1, "K"), "classes per image when a request does not say", 1),
        cli.Option(
            "threshold",
            cli.number(0, 1, "P"),
            "mark images whose top probability is below P as uncertain",
            shown="the value in <checkpoint stem>.threshold.json next to the checkpoint, if any",
        ),
    ),
    positional=("ckpt_path",),
    epilog="Exit status: 0 after SIGTERM or Ctrl-C, 2 a usage error (an unreadable checkpoint, a port "
    "in use).\n"
    "Also: python -m transfer_learning.serve key=value ...",
)


def parse_args(argv: Sequence[str] | None) -> dict[str, Any]:
    return COMMAND.parse_or_exit(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command; returns its exit status. ``--help`` and a mistake answer before torch loads."""
    argv = sys.argv[1:] if argv is None else argv
    if cli.wants_help(argv):
        print(COMMAND.usage())
        return 0
    values = parse_args(argv)
    from transfer_learning.serve.server import run

    return run(values)


if __name__ == "__main__":
    raise SystemExit(main())
