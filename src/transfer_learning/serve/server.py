"""Starting and stopping ``tl-serve``: load the checkpoint as ``tl-predict`` does, pick the
backend, listen, and on SIGTERM or Ctrl-C stop accepting, answer the requests in flight and
exit 0."""

from __future__ import annotations

import errno
import logging
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from transfer_learning.errors import ConfigError, TransferLearningError, user_message
from transfer_learning.readers import read_export_metadata
from transfer_learning.results.model_card import card_for_checkpoint
from transfer_learning.results.predict import Classifier, checkpoint_problem, problem
from transfer_learning.serve.app import Settings, create_app, describe_model
from transfer_learning.serve.uploads import Limits

log = logging.getLogger(__name__)
GRACE_SECONDS = 30  # how long SIGTERM waits for the requests in flight
# The start-up line's address (tests and scripts/load_test.py read it to find port=0's port).
LISTENING = re.compile(r"listening on http://(?P<host>[^ ]+):(?P<port>\d+)")
PARITY_ATOL = 1e-3  # tl-export's default: ONNX Runtime reorders float operations


def share_threads(requested: int | None, device: torch.device) -> tuple[int, int]:
    """How many batches run at once (``workers=``; auto: ``min(4, threads)`` on a CPU, 1 on a
    GPU) and PyTorch's intra-op threads each, the CPU threads shared among them (set here)."""
    if device.type != "cpu":
        return requested or 1, torch.get_num_threads()
    total = torch.get_num_threads()
    workers = requested or min(4, total)
    threads = max(1, total // workers)
    torch.set_num_threads(threads)
    return workers, threads


def onnx_logits(
    classifier: Classifier, checkpoint: Path, workdir: Path, threads: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The network in ONNX Runtime: ``<ckpt stem>.onnx`` (``tl-export``'s file) when it exists,
    else exported now into ``workdir``; either way checked against the checkpoint on a batch
    first (a file left from an older checkpoint of the same name is refused)."""
    import onnxruntime as ort

    from transfer_learning.results.export import INPUT_NAME, OUTPUT_NAME, export_onnx, model_metadata

    module = classifier.module
    size = module.preprocessing.crop_size
    path = checkpoint.with_name(checkpoint.stem + ".onnx")
    origin = str(path)
    stale = (
        f"{path} was exported from another checkpoint. Export it again with "
        f"tl-export ckpt_path={checkpoint}, or delete it."
    )
    if path.is_file() and read_export_metadata(path).get("class_names") != classifier.class_names:
        raise ConfigError(f"{stale} (its class names differ)")
    if not path.is_file():
        path = workdir / path.name
        origin = f"exported at start into {workdir} (tl-export ckpt_path={checkpoint} keeps one)"
        print(f"tl-serve: exporting {checkpoint.name} to ONNX ...", file=sys.stderr, flush=True)
        export_onnx(
            module.net.eval(), torch.zeros(2, 3, size, size), path, model_metadata(module, checkpoint)
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1  # per worker
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: batch.cpu().numpy()})[0])

    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        try:
            gap = float((run(probe) - module(probe)).abs().max())
        except Exception as exc:  # another input size or number of classes
            raise ConfigError(f"{stale} ({problem(exc)})") from None
    if not gap <= PARITY_ATOL:
        raise ConfigError(f"{stale} (its logits differ from the checkpoint's by {gap:.3g})")
    return run, origin


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, made with ``IPPROTO_TCP`` so that asyncio turns Nagle off
    (TCP_NODELAY) on every connection it accepts: ``socket.create_server`` leaves the protocol 0,
    asyncio then leaves Nagle on, and each answer's body (sent after its headers) waits for
    the client's delayed ACK, 40 ms a request on Linux."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
        return sock
    except OSError as exc:
        sock.close()
        taken = exc.errno == errno.EADDRINUSE
        hint = " (another server has it: choose another port=, or port=0 for any free one)" if taken else ""
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None


def run(values: dict[str, Any]) -> int:
    """The command, its ``key=value`` settings read (:mod:`transfer_learning.cli.serve`)."""
    checkpoint: Path = values["ckpt_path"]
    unusable = checkpoint_problem(checkpoint)
    if unusable:
        print(f"error: {unusable}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tl-serve-"))
    try:
        return _serve(values, checkpoint, workdir)
    except TransferLearningError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _serve(values: dict[str, Any], checkpoint: Path, workdir: Path) -> int:
    import uvicorn

    backend = values["backend"]
    device = values["device"]
    if backend == "onnx" and device not in ("auto", "cpu"):
        raise ConfigError(
            f"backend=onnx runs on the CPU (ONNX Runtime's CPU provider); device={device} needs "
            "backend=pytorch."
        )
    threshold = values["threshold"]
    classifier = Classifier.from_checkpoint(
        checkpoint,
        device="cpu" if backend == "onnx" else device,
        threshold="auto" if threshold is None else threshold,
    )
    workers, threads = share_threads(values["workers"], classifier.device)
    running = "PyTorch"
    if backend == "onnx":
        classifier.logits, origin = onnx_logits(classifier, checkpoint, workdir, threads)
        running = f"ONNX Runtime ({origin})"
    if classifier.device.type == "cpu":
        running += f", {workers} worker(s) x {threads} thread(s)"
    limits = Limits(values["max_upload_mb"], values["max_images"], values["max_pixels"])
    settings = Settings(
        values["max_batch_size"],
        workers,
        values["batch_timeout"],
        values["max_queue"],
        values["top_k"],
        backend,
        limits,
    )
    info = describe_model(
        classifier, settings, checkpoint, card_for_checkpoint(checkpoint, classifier.module)
    )
    app = create_app(classifier, settings, info)
    sock = listen(values["host"], values["port"])
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    module = classifier.module
    print(
        f"tl-serve: {checkpoint.name} ({module.task}, {len(classifier.class_names)} classes) on "
        f"{classifier.device.type} with {running}; listening on http://{shown}:{port} "
        "(the web page at /; SIGTERM or Ctrl-C stops it)",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    config = uvicorn.Config(
        app, log_level="info", access_log=False, server_header=False, lifespan="on",
        timeout_graceful_shutdown=GRACE_SECONDS, timeout_keep_alive=5,
    )  # fmt: skip
    server = uvicorn.Server(config)
    # uvicorn answers SIGTERM/SIGINT itself (stop accepting, drain, shut down), then raises the
    # signal again for the handler it found: this no-op one, so the process exits 0 afterwards.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:  # the lifespan failed: uvicorn logged why
        return 2
    batcher = app.state.batcher
    print(
        f"tl-serve: stopped; served {batcher.images} image(s) in {batcher.batches} batch(es)",
        file=sys.stderr,
        flush=True,
    )
    return 0
