"""The prediction server: FastAPI routes on uvicorn, in front of the dynamic batcher
(:class:`~transfer_learning.serve.batcher.Batcher`).

``POST /predict`` (images in, per image the top-k calibrated classes and the ``uncertain`` flag,
multi-label: the label set; ``explain=true`` adds the Grad-CAM overlay), ``GET /health``,
``GET /info`` (classes, task, preprocessing, calibration, limits and the model card) and the web
page at ``/``. Every refusal is one JSON object ``{"error": "..."}`` with a 4xx status (503 with
``Retry-After`` when the queue is full); an unexpected failure is a 500 whose body names no file,
line or traceback (those go to the server's log).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from transfer_learning.results.predict import Classifier, prediction_record
from transfer_learning.serve.batcher import Batcher, gradcam_png
from transfer_learning.serve.uploads import BadRequest, Limits, open_image, read_body, read_uploads

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Settings:
    max_batch_size: int = 16
    workers: int = 1
    batch_timeout: float = 0.005
    max_queue: int = 64
    top_k: int = 1
    backend: str = "pytorch"
    limits: Limits = field(default_factory=Limits)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _top_k(value: Any, default: int) -> int:
    if value is None:
        return default
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise BadRequest(400, f"top_k must be a whole number, got {value!r}") from None
    if k < 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise BadRequest(400, f"top_k must be a whole number of at least 1, got {value!r}")
    return k


def _flag(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if str(value).strip().lower() in TRUE:
        return True
    if str(value).strip().lower() in FALSE:
        return False
    raise BadRequest(400, f"{name} must be true or false, got {value!r}")


def create_app(classifier: Classifier, settings: Settings, info: dict[str, Any]) -> FastAPI:
    """The application around a loaded classifier; ``info``: what ``GET /info`` answers."""
    batcher = Batcher(
        classifier, settings.max_batch_size, settings.batch_timeout, settings.max_queue, settings.workers
    )
    limits = settings.limits

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:  # after uvicorn answered the requests in flight
            await batcher.stop()
            log.info("served %d image(s) in %d batch(es)", batcher.images, batcher.batches)

    app = FastAPI(
        title="tl-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )  # the docs pages load scripts from a CDN: not offline
    app.state.batcher = batcher

    @app.exception_handler(BadRequest)
    async def refused(_request: Request, exc: BadRequest) -> JSONResponse:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def failed(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); the server's log has the details")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "requests_in_flight": batcher.requests,
            "images_waiting": len(batcher.pending),
            "images_served": batcher.images,
            "batches": batcher.batches,
            "workers": batcher.workers,
            "batches_at_once_peak": batcher.peak,
        }

    @app.get("/info")
    async def describe() -> dict[str, Any]:
        return info

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        batcher.admit()  # before the body is read: a full queue costs nothing
        try:
            return await _predict(request)
        finally:
            batcher.done()

    async def _predict(request: Request) -> JSONResponse:
        body = await read_body(request.stream(), request.headers.get("content-length"), limits)
        uploads, fields = await read_uploads(
            request.headers.get("content-type", ""), body, request.headers, limits
        )
        query = request.query_params
        top_k = _top_k(query.get("top_k", fields.get("top_k")), settings.top_k)
        explain = _flag(query.get("explain", fields.get("explain")), "explain")
        loop = asyncio.get_running_loop()

        def prepare() -> list[Any]:  # decoding and preprocessing, off the event loop
            images = [open_image(upload, limits) for upload in uploads]
            return [(image, classifier.transform(image)) for image in images]

        prepared = await loop.run_in_executor(None, prepare)
        predictions = await batcher.predict([t for _, t in prepared], [u.name for u in uploads], top_k)
        records = [prediction_record(p) for p in predictions]
        if explain:
            pictures = await batcher.in_worker(
                lambda: [
                    gradcam_png(classifier, t, image, p)
                    for (image, t), p in zip(prepared, predictions, strict=True)
                ]
            )
            for record, picture in zip(records, pictures, strict=True):
                record["gradcam"] = picture
        return JSONResponse(
            {"task": info["task"], "uncertain_threshold": classifier.threshold, "predictions": records}
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def describe_model(
    classifier: Classifier, settings: Settings, checkpoint: Path, card: dict[str, Any]
) -> dict[str, Any]:
    """``GET /info``: what a client needs to send images and read the answers."""
    module = classifier.module
    pre = module.preprocessing
    info: dict[str, Any] = {
        "checkpoint": checkpoint.name,
        "task": module.task,
        "classes": classifier.class_names,
        "input_size": pre.crop_size,
        "preprocessing": {
            "resize": pre.resize_size,
            "center_crop": pre.crop_size,
            "interpolation": pre.interpolation,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "decoding": "RGB, EXIF orientation applied, 16-bit scaled to 8, transparency on white",
        },
        "temperature": float(module.temperature),
        "uncertain_threshold": classifier.threshold,
        "backend": settings.backend,
        "device": str(classifier.device),
        "max_batch_size": settings.max_batch_size,
        "workers": settings.workers,
        "batch_timeout_s": settings.batch_timeout,
        "max_queue": settings.max_queue,
        "limits": asdict(settings.limits),
        "model_card": card,
    }
    if module.thresholds is not None:
        info["thresholds"] = dict(
            zip(classifier.class_names, [float(t) for t in module.thresholds], strict=True)
        )
    return info
