"""tl-serve under load, against tl-predict's in-process rate on the same images and machine.

    python scripts/load_test.py --ckpt CKPT [--images DIR] [--clients 1,8,32] [--requests 40]
        [--soak 120] [--server-setting KEY=VALUE ...] [--url http://HOST:PORT [--pid PID]]

First the in-process baseline: the checkpoint loaded with `Classifier.from_checkpoint`,
`predict_listed` over the images as `tl-predict` runs it (batch_size=32, its loader workers),
images/s of the fastest of five passes after a warm-up. Then it starts `python -m
transfer_learning.serve ckpt_path=CKPT port=0` on 127.0.0.1 and, for each number of clients,
runs that many client threads, each with its own keep-alive connection sending `--requests`
POST /predict requests of one image (multipart, as `curl -F file=@...` sends it). `--soak S`
then keeps 8 clients busy for S seconds and samples the server's resident memory (VmRSS from
/proc) every 15 s. The server is stopped with SIGTERM, the baseline measured again (three
passes), and the table printed: throughput (images/s), its ratio to the faster of the two
baselines (noise never flatters it), p50/p95/p99 latency and errors (any answer but 200, or a
broken connection). Without `--images` it writes 64 generated demo images (the checkpoint's
input size) in a temporary folder. The clients share the machine with the server: on 2 cores
they take CPU from it, which the ratio includes. `--url` measures a server already running
instead (the LitServe comparison in docs/serving.md; `--pid` gives its memory to the soak).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BOUNDARY = "tl-load-test-3f9a"


def multipart(name: str, data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
    return head.encode() + b"Content-Type: image/jpeg\r\n\r\n" + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def demo_images(folder: Path, size: int) -> list[Path]:
    from transfer_learning.data.demo import generate_shapes
    from transfer_learning.data.images import list_images

    return list_images(generate_shapes(folder / "shapes", images_per_class=13, image_size=size)).files[:64]


def in_process_rate(checkpoint: Path, files: list[Path], passes: int) -> float:
    """Images/s of tl-predict's own loop (batch_size 32, its loader workers), best of ``passes``."""
    from transfer_learning.results.predict import Classifier, auto_workers

    classifier = Classifier.from_checkpoint(checkpoint, device="cpu")
    workers = auto_workers(len(files), 32)
    classifier.predict_listed(files[:32], 32, 1, 0, False)  # warm-up
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        predictions, bad = classifier.predict_listed(files, 32, 1, workers, False)
        best = min(best, time.perf_counter() - start)
        assert len(predictions) == len(files) and not bad, bad
    return len(files) / best


def start_server(
    checkpoint: Path, settings: list[str], log: Path
) -> tuple[subprocess.Popen[bytes], str, int]:
    from transfer_learning.serve.server import LISTENING

    command = [
        sys.executable,
        "-m",
        "transfer_learning.serve",
        f"ckpt_path={checkpoint}",
        "port=0",
        *settings,
    ]
    with open(log, "wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_text(errors="replace"))
        if found:
            return process, found["host"], int(found["port"])
        if process.poll() is not None:
            sys.exit(f"tl-serve exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    process.kill()
    sys.exit(f"tl-serve did not start in 300 s:\n{log.read_text()}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Client(threading.Thread):
    """One client: a keep-alive connection, requests one after another."""

    def __init__(self, host: str, port: int, bodies: list[tuple[str, bytes]], requests: int | None,
                 until: float | None, first: int) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.host, self.port, self.bodies, self.requests, self.until = host, port, bodies, requests, until
        self.first = first  # the clients start at different images
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    def run(self) -> None:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        i = 0
        while (self.requests is not None and i < self.requests) or (
            self.until and time.monotonic() < self.until
        ):
            _, body = self.bodies[(self.first + i) % len(self.bodies)]
            start = time.perf_counter()
            try:
                connection.request("POST", "/predict", body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status == 200:
                    self.latencies.append(time.perf_counter() - start)
                else:
                    self.errors[str(response.status)] = self.errors.get(str(response.status), 0) + 1
            except (OSError, http.client.HTTPException) as exc:
                self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                connection.close()
                connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
            i += 1
        connection.close()


def run_clients(host: str, port: int, bodies: list[tuple[str, bytes]], clients: int,
                requests: int | None = None, until: float | None = None) -> dict:  # fmt: skip
    threads = [Client(host, port, bodies, requests, until, 7 * n) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies = sorted(x for t in threads for x in t.latencies)
    errors: dict[str, int] = {}
    for thread in threads:
        for key, n in thread.errors.items():
            errors[key] = errors.get(key, 0) + n
    return {"clients": clients, "ok": len(latencies), "errors": errors, "wall": wall, "latencies": latencies}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def print_table(rows: list[dict], baseline: float) -> None:
    print(
        f"\n{'clients':>7} {'requests':>8} {'images/s':>9} {'x in-proc':>9} {'p50 ms':>8} "
        f"{'p95 ms':>8} {'p99 ms':>8} {'errors':>7}"
    )
    for r in rows:
        rate, lat, errors = r["ok"] / r["wall"], r["latencies"], sum(r["errors"].values())
        print(
            f"{r['clients']:>7} {r['ok'] + errors:>8} {rate:>9.1f} {rate / baseline:>9.2f} "
            f"{1000 * percentile(lat, 50):>8.0f} {1000 * percentile(lat, 95):>8.0f} "
            f"{1000 * percentile(lat, 99):>8.0f} {errors:>7}" + (f"  {r['errors']}" if errors else "")
        )


def soak_memory(pid: int, host: str, port: int, bodies: list[tuple[str, bytes]], seconds: float) -> None:
    """8 busy clients for ``seconds``; the server's VmRSS every 15 s and its growth after the
    first minute (allocator pools and caches fill in the first seconds)."""
    print(f"soak: 8 clients for {seconds:.0f} s; server memory (VmRSS):", flush=True)
    until = time.monotonic() + seconds
    samples: list[tuple[float, float]] = []
    result: dict = {}
    soak = threading.Thread(target=lambda: result.update(run_clients(host, port, bodies, 8, until=until)))
    begin = time.monotonic()
    soak.start()
    while soak.is_alive():
        samples.append((time.monotonic() - begin, rss_mb(pid)))
        print(f"  {samples[-1][0]:6.0f} s  {samples[-1][1]:8.1f} MB", flush=True)
        soak.join(15)
    samples.append((time.monotonic() - begin, rss_mb(pid)))
    after_minute = next((mb for t, mb in samples if t >= 60), samples[0][1])
    errors, growth = sum(result["errors"].values()), samples[-1][1] - after_minute
    print(
        f"  end {samples[-1][1]:.1f} MB; growth after the first minute {growth:+.1f} MB; "
        f"{result['ok']} requests at {result['ok'] / result['wall']:.1f} images/s, {errors} errors"
        + (f" {result['errors']}" if errors else "")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a checkpoint of a trained run")
    parser.add_argument("--images", type=Path, help="a folder of images (default: 64 generated ones)")
    parser.add_argument("--clients", default="1,8,32", help="numbers of concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=40, help="requests per client (one image each)")
    parser.add_argument(
        "--soak", type=float, default=120, help="seconds of 8 busy clients for memory (0: none)"
    )
    parser.add_argument("--server-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a tl-serve setting, e.g. max_batch_size=32 (repeatable)")  # fmt: skip
    parser.add_argument("--url", help="measure a server already running at http://HOST:PORT instead")
    parser.add_argument("--pid", type=int, help="with --url: its process, for the soak's memory")
    args = parser.parse_args()
    if not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file (a run's checkpoints/best-*.ckpt)")
    os.environ.setdefault("WANDB_MODE", "offline")

    import torch

    from transfer_learning.data.images import list_images
    from transfer_learning.hardware import cpu_description
    from transfer_learning.model.module import TransferLearningModule
    from transfer_learning.serve.server import LISTENING

    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="tl-load-") as tmp:
        if args.images:
            files = list_images(args.images).files[:64]
        else:
            size = TransferLearningModule.load_for_inference(args.ckpt).preprocessing.crop_size
            files = demo_images(Path(tmp), size)
        bodies = [(f.name, multipart(f.name, f.read_bytes())) for f in files]
        print(f"{len(files)} images from {files[0].parent.parent}; checkpoint {args.ckpt}")
        before = in_process_rate(args.ckpt, files, 5)
        print(f"in-process (Classifier.predict_listed, as tl-predict): {before:.1f} images/s", flush=True)

        log = Path(tmp) / "serve.log"
        process = None
        if args.url:  # a server already running (another implementation, or behind a proxy)
            found = re.fullmatch(r"http://([^/:]+):(\d+)/?", args.url)
            if not found:
                parser.error(f"--url {args.url}: expected http://HOST:PORT")
            host, port = found[1], int(found[2])
            print(f"the server at {args.url}" + (f" (pid {args.pid})" if args.pid else ""))
        else:
            process, host, port = start_server(args.ckpt, args.server_setting, log)
            print(next(line for line in log.read_text().splitlines() if LISTENING.search(line)))
        rows: list[dict] = []
        try:
            run_clients(host, port, bodies, 2, requests=8)  # warm-up
            for clients in [int(c) for c in args.clients.split(",")]:
                rows.append(run_clients(host, port, bodies, clients, requests=args.requests))
                print(f"  {clients} clients: {rows[-1]['ok'] / rows[-1]['wall']:.1f} images/s", flush=True)
            pid = process.pid if process else args.pid
            if args.soak > 0 and pid:
                soak_memory(pid, host, port, bodies, args.soak)
        finally:
            if process:
                process.send_signal(signal.SIGTERM)
                code = process.wait(60)
                lines = log.read_text(errors="replace").strip().splitlines()
                print(f"tl-serve exit {code}: {lines[-1] if lines else ''}")
        after = in_process_rate(args.ckpt, files, 3)
        baseline = max(before, after)  # the faster of the two: the ratio is never flattered
        print(f"in-process again, after the server stopped: {after:.1f} images/s; ratios use {baseline:.1f}")
        print_table(rows, baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
