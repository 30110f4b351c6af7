"""A real ``tl-serve`` process for the tests, and plain HTTP to it (the standard library's
``http.client``: the tests send exactly the bytes they mean, bad ones included)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkrun import run_python

from transfer_learning.serve.server import LISTENING


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def connection(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """(status, headers, the JSON body or the text) of one request on a new connection."""
        connection = self.connection()
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            raw = response.read()
            kind = response.getheader("content-type", "")
            data = json.loads(raw) if kind.startswith("application/json") else raw.decode(errors="replace")
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            connection.close()

    def get(self, path: str) -> Any:
        status, _, data = self.request("GET", path)
        assert status == 200, (status, data)
        return data

    def post_files(
        self, files: Sequence[tuple[str, bytes]], query: str = ""
    ) -> tuple[int, dict[str, str], Any]:
        body, kind = multipart(files)
        return self.request("POST", f"/predict{query}", body, {"Content-Type": kind})

    def post_json(self, payload: Any, query: str = "") -> tuple[int, dict[str, str], Any]:
        data = json.dumps(payload).encode()
        return self.request("POST", f"/predict{query}", data, {"Content-Type": "application/json"})


def multipart(files: Sequence[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body with one part per (filename, bytes), and its content type."""
    boundary = "tl-serve-test-boundary-7d1c"
    parts = []
    for name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def start(checkpoint: Path, *settings: str, log: Path, env: dict[str, str] | None = None) -> Server:
    """``python -m transfer_learning.serve ckpt_path=CKPT port=0 ...`` as a fresh process; returns
    once it prints the address it listens on."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "transfer_learning.serve", f"ckpt_path={checkpoint}", "port=0", *settings],
            stdout=subprocess.DEVNULL, stderr=err, env=environment,
        )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_text(errors="replace"))
        if found:
            server = Server(process, found["host"], int(found["port"]), log)
            wait_until_ready(server)
            return server
        if process.poll() is not None:
            raise AssertionError(f"tl-serve exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"tl-serve did not start:\n{log.read_text()}")


def wait_until_ready(server: Server) -> None:
    for _ in range(200):
        with contextlib.suppress(OSError):
            if server.request("GET", "/health")[0] == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"/health never answered:\n{server.stderr()}")


def stop(server: Server, timeout: float = 60) -> int:
    """SIGTERM, then the exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise


@contextlib.contextmanager
def serving(checkpoint: Path, *settings: str, log: Path) -> Iterator[Server]:
    server = start(checkpoint, *settings, log=log)
    try:
        yield server
    finally:
        stop(server)


def tl_predict(tmp_path: Path, checkpoint: Path, files: list[Path], *settings: str) -> dict:
    output = tmp_path / "preds.json"
    listed = "[" + ",".join(str(f) for f in files) + "]"
    result = run_python(
        ["-m", "transfer_learning.results.predict", f"ckpt_path={checkpoint}", f"images={listed}",
         f"output={output}", *settings], cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(output.read_text())


def assert_same(served: list[dict], predicted: list[dict], names: list[str]) -> None:
    """Every class's probability to 1e-5, and the same decisions, image by image."""
    assert [r["file"] for r in served] == names
    for mine, theirs in zip(served, predicted, strict=True):
        assert mine["predicted"] == theirs["predicted"]
        assert mine.keys() == theirs.keys() | ({"gradcam"} & mine.keys())
        for name, p in theirs["probabilities"].items():
            assert abs(mine["probabilities"][name] - p) <= 1e-5, (name, mine["probabilities"][name], p)
        if "top_k" in theirs:
            assert [e["class"] for e in mine["top_k"]] == [e["class"] for e in theirs["top_k"]]
            assert mine["uncertain"] == theirs["uncertain"]
