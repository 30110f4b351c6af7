"""`tl-serve` as a real process on 127.0.0.1: the same numbers as `tl-predict`, every bad input a
4xx JSON error with the server still answering, the bounded queue's 503, dynamic batching,
Grad-CAM, the ONNX backend, multi-label checkpoints, SIGTERM, and the model card."""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from forkrun import run_python
from PIL import Image
from serving import Server, assert_same, b64, multipart, serving, start, tl_predict

from helpers import REPO, best_checkpoint
from transfer_learning.data.images import list_images

LIMITS = ("max_upload_mb=0.25", "max_images=4", "max_pixels=1000000", "batch_timeout=0.05")


def files_of(shapes_dir: Path, n: int) -> list[Path]:
    every = list_images(shapes_dir).files
    return every[:: max(1, len(every) // n)][:n]


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server for the module's quick tests, with small limits (so that breaking them is cheap)."""
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    with serving(best_checkpoint(trained_run), *LIMITS, log=log) as running:
        yield running


@pytest.mark.slow
def test_the_server_gives_tl_predicts_numbers_for_uploads_and_base64(
    server, trained_run, shapes_dir, tmp_path
):
    checkpoint = best_checkpoint(trained_run)
    files = files_of(shapes_dir, 6)
    expected = tl_predict(tmp_path, checkpoint, files, "top_k=3", "threshold=0.9")
    # The same threshold as tl-predict's: started here with threshold=0.9 (the module's server has none).
    with serving(checkpoint, "threshold=0.9", log=tmp_path / "t.log") as flagged:
        status, _, body = flagged.post_files([(f.name, f.read_bytes()) for f in files[:4]], "?top_k=3")
        assert status == 200, body
        assert_same(body["predictions"], expected["predictions"][:4], [f.name for f in files[:4]])
        assert body["uncertain_threshold"] == 0.9
    # JSON with base64, one image per request, on the module's server (no threshold: none uncertain).
    plain = tl_predict(tmp_path, checkpoint, files, "top_k=3")
    for file, theirs in zip(files, plain["predictions"], strict=True):
        status, _, body = server.post_json({"images": [{"name": file.name, "data": b64(file)}], "top_k": 3})
        assert status == 200, body
        assert_same(body["predictions"], [theirs], [file.name])
    status, _, body = server.request(
        "POST", "/predict?top_k=2", files[0].read_bytes(), {"Content-Type": "image/jpeg"}
    )
    assert status == 200 and body["predictions"][0]["file"] == "<body>"
    assert body["predictions"][0]["predicted"] == plain["predictions"][0]["predicted"]
    assert len(body["predictions"][0]["top_k"]) == 2


def test_health_and_info_describe_the_checkpoint(server, trained_run):
    assert server.get("/health")["status"] == "ok"
    info = server.get("/info")
    card = json.loads((trained_run / "model_card.json").read_text())
    assert info["classes"] == ["circle", "cross", "square", "star", "triangle"] == card["data"]["classes"]
    assert info["task"] == "multiclass" and info["input_size"] == 48
    assert info["preprocessing"]["center_crop"] == 48 and len(info["preprocessing"]["mean"]) == 3
    summary = json.loads((trained_run / "summary.json").read_text())
    assert f"temperature {info['temperature']:.3f}" in summary["calibration"]
    assert info["model_card"] == card
    assert info["limits"] == {"max_upload_mb": 0.25, "max_images": 4, "max_pixels": 1000000}
    assert "listening on http://127.0.0.1:" in server.stderr()  # the default host: this machine only


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_requests(good: bytes) -> dict[str, tuple[tuple, int, str]]:
    """name -> ((method, path, body, headers), the status, a word the error must hold)."""
    many, kind = multipart([(f"{i}.jpg", good) for i in range(5)])
    big, big_kind = multipart([("big.jpg", good + b"\0" * 300_000)])

    def upload(name: str, data: bytes) -> tuple:
        body, content = multipart([(name, data)])
        return ("POST", "/predict", body, {"Content-Type": content})

    return {
        "not an image": (upload("notes.jpg", b"just some text, not a picture"), 400, "not an image"),
        "truncated": (upload("cut.jpg", good[: len(good) // 2]), 400, "truncated"),
        "decompression bomb": (upload("bomb.png", png(1200, 1200)), 413, "max_pixels"),
        "empty file": (upload("empty.jpg", b""), 400, "empty"),
        "empty body": (("POST", "/predict", b"", {"Content-Type": "image/jpeg"}), 400, "empty"),
        "wrong content type": (
            ("POST", "/predict", b"hello", {"Content-Type": "text/plain"}),
            415,
            "content type",
        ),
        "over the size limit": (("POST", "/predict", big, {"Content-Type": big_kind}), 413, "max_upload_mb"),
        "too many images": (("POST", "/predict", many, {"Content-Type": kind}), 413, "max_images"),
        "path in the filename": (upload("../../etc/passwd", good), 400, "path"),
        "backslash in the filename": (upload("..\\boot.ini", good), 400, "path"),
        "control character in the filename": (upload("a\x1b[2Jb.jpg", good), 400, "control"),
        "not JSON": (("POST", "/predict", b"{nope", {"Content-Type": "application/json"}), 400, "JSON"),
        "not base64": (
            (
                "POST",
                "/predict",
                json.dumps({"images": ["@@@"]}).encode(),
                {"Content-Type": "application/json"},
            ),
            400,
            "base64",
        ),
        "broken multipart": (
            ("POST", "/predict", b"--x\r\nnonsense", {"Content-Type": "multipart/form-data; boundary=x"}),
            400,
            "",
        ),
        "bad top_k": (("POST", "/predict?top_k=zero", good, {"Content-Type": "image/jpeg"}), 400, "top_k"),
        "bad explain": (
            ("POST", "/predict?explain=maybe", good, {"Content-Type": "image/jpeg"}),
            400,
            "explain",
        ),
        "unknown path": (("GET", "/admin", None, {}), 404, "Not Found"),
        "wrong method": (("GET", "/predict", None, {}), 405, "Method Not Allowed"),
        "static path escape": (("GET", "/static/../../serve/app.py", None, {}), 404, ""),
    }


def test_every_bad_input_gets_its_4xx_json_error_and_the_server_keeps_answering(server, shapes_dir):
    good = files_of(shapes_dir, 1)[0].read_bytes()
    for name, (request, status, word) in bad_requests(good).items():
        got, headers, body = server.request(*request)
        assert got == status, (name, got, body)
        assert headers["content-type"] == "application/json", name
        assert list(body) == ["error"] and word in body["error"], (name, body)
        assert "Traceback" not in body["error"] and 'File "' not in body["error"], name
        answered, _, fine = server.post_files([("ok.jpg", good)])
        assert answered == 200 and fine["predictions"][0]["file"] == "ok.jpg", (name, fine)
    assert "Traceback" not in server.stderr()


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server):
    connection = server.connection(timeout=30)
    try:  # only the headers go out: the 413 answers without the 10 MB the header announces
        connection.putrequest("POST", "/predict")
        connection.putheader("Content-Type", "image/jpeg")
        connection.putheader("Content-Length", str(10 * 1024 * 1024))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413 and "max_upload_mb" in json.loads(response.read())["error"]
    finally:
        connection.close()


def test_grad_cam_comes_as_a_png_of_the_predicted_class(server, shapes_dir):
    files = files_of(shapes_dir, 2)
    status, _, body = server.post_files([(f.name, f.read_bytes()) for f in files], "?explain=true")
    assert status == 200, body
    for record, file in zip(body["predictions"], files, strict=True):
        picture = Image.open(io.BytesIO(base64.b64decode(record["gradcam"]["png"])))
        assert picture.format == "PNG" and picture.size == Image.open(file).size  # 48 px: not shrunk
        assert record["gradcam"]["class"] == record["predicted"]
    status, _, body = server.post_files([(files[0].name, files[0].read_bytes())])
    assert "gradcam" not in body["predictions"][0]


def test_concurrent_requests_are_batched_together(server, shapes_dir):
    good = files_of(shapes_dir, 1)[0].read_bytes()
    before = server.get("/health")
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(server.post_files([("x.jpg", good)])[0]))
               for _ in range(8)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = server.get("/health")
    assert answers == [200] * 8
    assert after["images_served"] - before["images_served"] == 8
    assert after["batches"] - before["batches"] < 8  # 50 ms for the others to join the first
    assert after["requests_in_flight"] == 0


@pytest.mark.slow
def test_two_workers_run_batches_at_once_and_grad_cam_alone(trained_run, shapes_dir, tmp_path):
    """Batches of one image on two workers; Grad-CAM requests among them still get the overlay a
    lone request gets (its hooks never see another batch's forward) and every number is the same."""
    files = files_of(shapes_dir, 4)
    uploads = [[(f.name, f.read_bytes())] for f in files]
    settings = ("workers=2", "max_batch_size=1", "batch_timeout=0")
    with serving(best_checkpoint(trained_run), *settings, log=tmp_path / "w.log") as server:
        lone = [server.post_files(u, "?explain=true")[2]["predictions"][0] for u in uploads]
        answers: dict[tuple[int, int], dict] = {}

        def send(i: int, round_: int) -> None:
            query = "?explain=true" if round_ % 2 else ""
            status, _, body = server.post_files(uploads[i], query)
            answers[i, round_] = body["predictions"][0] if status == 200 else body

        threads = [threading.Thread(target=send, args=(i, r)) for r in range(4) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        health = server.get("/health")
    assert health["workers"] == 2 and health["batches_at_once_peak"] == 2
    assert len(answers) == 16
    for (i, round_), record in answers.items():
        assert record["probabilities"] == pytest.approx(lone[i]["probabilities"], abs=1e-6)
        if round_ % 2:
            assert record["gradcam"] == lone[i]["gradcam"]
        else:
            assert "gradcam" not in record


def test_the_listening_socket_turns_nagle_off_for_every_connection():
    """Else each answer's body, written after its headers, waits for the client's delayed ACK:
    40 ms a request on Linux (the load benchmark found it)."""
    from transfer_learning.serve.server import listen

    with listen("127.0.0.1", 0) as sock, socket.create_connection(sock.getsockname()[:2]):
        accepted, _ = sock.accept()
        with accepted:
            assert accepted.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY only then
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def held_request(server: Server, body: bytes, kind: str) -> socket.socket:
    """A request whose headers and first half of body are sent, the rest held back."""
    sock = socket.create_connection((server.host, server.port), timeout=60)
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body[: len(body) // 2])
    return sock


def finish(sock: socket.socket, body: bytes) -> tuple[int, dict]:
    sock.sendall(body[len(body) // 2 :])
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
        next(
            line.split(b":")[1] for line in data.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
    ):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    head, payload = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(payload)


@pytest.mark.slow
def test_a_full_queue_answers_503_with_retry_after_then_serves_again(trained_run, shapes_dir, tmp_path):
    good = files_of(shapes_dir, 1)[0].read_bytes()
    body, kind = multipart([("held.jpg", good)])
    with serving(best_checkpoint(trained_run), "max_queue=1", log=tmp_path / "q.log") as server:
        held = held_request(server, body, kind)
        time.sleep(0.5)  # admitted: its body is still coming
        status, headers, refused = server.post_files([("more.jpg", good)])
        assert status == 503 and headers["retry-after"] == "1" and "max_queue=1" in refused["error"]
        assert finish(held, body)[0] == 200
        assert server.post_files([("more.jpg", good)])[0] == 200


@pytest.mark.slow
def test_sigterm_answers_the_request_in_flight_then_exits_0(trained_run, shapes_dir, tmp_path):
    good = files_of(shapes_dir, 1)[0].read_bytes()
    body, kind = multipart([("last.jpg", good)])
    server = start(best_checkpoint(trained_run), log=tmp_path / "term.log")
    held = held_request(server, body, kind)
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    with pytest.raises(OSError):  # no longer accepting
        socket.create_connection((server.host, server.port), timeout=5).close()
    status, answer = finish(held, body)
    assert status == 200 and answer["predictions"][0]["file"] == "last.jpg"
    assert server.process.wait(60) == 0
    assert "served 1 image(s)" in server.stderr()


@pytest.mark.slow
def test_the_onnx_backend_gives_the_same_answers(trained_run, multilabel_run, shapes_dir, tmp_path):
    files = files_of(shapes_dir, 4)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # the ONNX file is exported next to a copy
    checkpoint = best_checkpoint(run)
    expected = tl_predict(tmp_path, checkpoint, files, "top_k=2")["predictions"]
    with serving(checkpoint, "backend=onnx", log=tmp_path / "onnx.log") as server:
        status, _, body = server.post_files([(f.name, f.read_bytes()) for f in files], "?top_k=2")
        assert server.get("/info")["backend"] == "onnx"
    assert status == 200, body
    assert "exported at start" in (tmp_path / "onnx.log").read_text()
    for mine, theirs in zip(body["predictions"], expected, strict=True):
        assert mine["predicted"] == theirs["predicted"]
        for name, p in theirs["probabilities"].items():  # ONNX Runtime reorders float operations
            assert abs(mine["probabilities"][name] - p) <= 1e-4
    stale = checkpoint.with_name(checkpoint.stem + ".onnx")  # another network's export: refused
    other = best_checkpoint(multilabel_run)  # the same five class names, other weights
    export = [
        str(REPO / "scripts" / "export.py"),
        f"ckpt_path={other}",
        f"output={stale}",
        f"images={shapes_dir}",
    ]
    result = run_python(export, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert stale.is_file()
    command = ["-m", "transfer_learning.serve", f"ckpt_path={checkpoint}", "backend=onnx", "port=0"]
    result = run_python(command, cwd=tmp_path, timeout=180)  # refused before it listens
    assert result.returncode == 2 and "exported from another checkpoint" in result.stderr, result.stderr
    assert f"tl-export ckpt_path={checkpoint}" in result.stderr


@pytest.mark.slow
def test_a_multilabel_checkpoint_answers_label_sets(multilabel_run, multilabel_dir, tmp_path):
    checkpoint = best_checkpoint(multilabel_run)
    files = list_images(multilabel_dir / "images").files[:4]
    expected = tl_predict(tmp_path, checkpoint, files)
    with serving(checkpoint, log=tmp_path / "ml.log") as server:
        status, _, body = server.post_files([(f.name, f.read_bytes()) for f in files], "?explain=true")
        info = server.get("/info")
    assert status == 200, body
    assert_same(body["predictions"], expected["predictions"], [f.name for f in files])
    assert all(isinstance(r["predicted"], list) and "top_k" not in r for r in body["predictions"])
    assert info["task"] == "multilabel" and list(info["thresholds"]) == expected["classes"]
    assert [info["thresholds"][n] for n in expected["classes"]] == pytest.approx(expected["thresholds"])
    card = (multilabel_run / "MODEL_CARD.md").read_text()
    assert "thresholds:" in card and "no uncertain flag" in card


def test_help_and_mistakes_answer_without_a_server(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-c", "import sys; from transfer_learning.cli.serve import main; main(['--help']);"
         "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "max_batch_size" in help_text.stdout and help_text.stdout.strip().endswith("False")
    for args, words in (
        (["ckpt_path=missing.ckpt"], "does not exist"),
        ([f"ckpt_path={tmp_path}"], "is a folder"),
        (["ckpt_path=x.ckpt", "backend=tensorrt"], "backend"),
        (["ckpt_path=x.ckpt", "max_batch_size=0"], "max_batch_size"),
    ):
        result = subprocess.run([sys.executable, "-m", "transfer_learning.serve", *args],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)


@pytest.mark.slow
def test_a_port_in_use_is_a_clear_error(trained_run, tmp_path):
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        result = run_python(
            ["-m", "transfer_learning.serve", f"ckpt_path={best_checkpoint(trained_run)}", f"port={port}"],
            cwd=tmp_path,
        )
    finally:
        taken.close()
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "port=0" in result.stderr


def test_the_model_card_is_written_from_the_run(trained_run):
    card = json.loads((trained_run / "model_card.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    text = (trained_run / "MODEL_CARD.md").read_text()
    assert summary["model card"] == str(trained_run / "MODEL_CARD.md")
    sizes = card["data"]["images_per_split"]
    assert "/".join(str(sizes[s]) for s in ("train", "val", "test")) == summary["images train/val/test"]
    assert sum(card["data"]["train_images_per_class"].values()) == sizes["train"]
    assert card["test_metrics"]["test/acc"]["value"] == pytest.approx(summary["test/acc"])
    low, high = card["test_metrics"]["test/acc"]["interval_95"]
    assert low == summary["test/acc_ci95_low"] and high == summary["test/acc_ci95_high"]
    assert card["model"]["backbone"] == "efficientnet_lite0" and card["model"]["weights"] == "bundled"
    assert card["strategy"]["name"] == summary["strategy"]
    assert card["reproduce"]["command"].startswith("python train.py ") and "input.image_size=48" in text
    assert (trained_run / card["files"]["checkpoint"]).is_file()
    assert all((trained_run / f).is_file() for f in card["files"].values())
    for section in ("## Model", "## Strategy", "## Data", "## Test metrics", "## Calibration",
                    "## Known limits", "## Reproduce", "## Files"):  # fmt: skip
        assert section in text
    assert summary["test/acc 95 %"] in text and "Out of distribution" in text
