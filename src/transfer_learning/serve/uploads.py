"""What a request to ``POST /predict`` carries, read as data: the body (no more than the upload
limit), the images in it (multipart files, JSON with base64, or one raw image body), their names,
and each image decoded exactly as ``tl-predict`` decodes a file. Every problem is a
:class:`BadRequest`: the HTTP status and one sentence saying what was wrong."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from transfer_learning.data.images import decode
from transfer_learning.results.predict import problem

HOW_TO_SEND = (
    "send images as multipart/form-data (curl -F file=@photo.jpg URL/predict), as JSON "
    '{"images": ["<base64>", ...]}, or one image as the body (Content-Type: image/jpeg)'
)


class BadRequest(Exception):
    """A request the server refuses: ``status`` (4xx, or 503 when busy) and the message."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Limits:
    """What one request may carry. ``max_upload_mb``: the whole body; ``max_images``: images per
    request; ``max_pixels``: width x height of one image (a larger one is refused before it is
    decoded: a small file can expand to gigabytes, a decompression bomb)."""

    max_upload_mb: float = 10.0
    max_images: int = 16
    max_pixels: int = 40_000_000

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes


def check_name(name: str | None, index: int) -> str:
    """The name an upload is answered under: its filename, which may not name a path (no ``/``,
    ``\\``, ``..``) or hold control characters; ``<image N>`` when it has none."""
    if not name:
        return f"<image {index}>"
    if len(name) > 255:
        raise BadRequest(400, f"image {index}: its filename is longer than 255 characters")
    if any(c in "/\\" for c in name) or name in (".", ".."):
        raise BadRequest(400, f"image {index}: the filename {name!r} holds a path; send the file's name only")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadRequest(400, f"image {index}: the filename {name!r} holds control characters")
    return name


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, limits: Limits) -> bytes:
    """The request body, refused (413) as soon as it passes the upload limit: by its declared
    ``Content-Length`` before a byte is read, else while it streams in."""
    too_large = BadRequest(
        413, f"the upload is larger than max_upload_mb={limits.max_upload_mb:g} MB: send fewer or smaller "
        "images per request (or start tl-serve with a larger max_upload_mb)",
    )  # fmt: skip
    if declared is not None:
        try:
            if int(declared) > limits.max_bytes:
                raise too_large
        except ValueError:
            raise BadRequest(400, f"Content-Length {declared!r} is not a number") from None
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limits.max_bytes:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


def _base64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(400, f"{where}: expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, f"{where}: not valid base64") from None


def json_uploads(body: bytes) -> tuple[list[Upload], dict[str, Any]]:
    """``{"images": ["<base64>" | {"name": ..., "data": "<base64>"}, ...], "top_k": K,
    "explain": bool}`` (or ``"image"`` for one): the uploads and the other settings."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(400, f"the body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, 'the JSON body must be an object: {"images": ["<base64>", ...]}')
    items = payload.get("images", [payload["image"]] if "image" in payload else None)
    if not isinstance(items, list):
        raise BadRequest(400, 'the JSON body needs "images": a list of base64 strings')
    uploads = []
    for i, item in enumerate(items):
        name, data = (item.get("name"), item.get("data")) if isinstance(item, dict) else (None, item)
        if name is not None and not isinstance(name, str):
            raise BadRequest(400, f"images[{i}]: name must be a string")
        uploads.append(Upload(check_name(name, i), _base64(data, f"images[{i}]")))
    settings = {k: payload[k] for k in ("top_k", "explain") if k in payload}
    return uploads, settings


async def multipart_uploads(headers: Any, body: bytes) -> tuple[list[Upload], dict[str, Any]]:
    """Every file part (whatever its field name) as an upload; the fields ``top_k`` and
    ``explain`` as settings."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body
        yield b""

    try:
        form = await MultiPartParser(headers, stream(), max_files=10_000, max_fields=100).parse()
    except MultiPartException as exc:
        raise BadRequest(400, f"cannot read the multipart body: {exc.message}") from None
    uploads: list[Upload] = []
    settings: dict[str, Any] = {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads.append(Upload(check_name(value.filename, len(uploads)), await value.read()))
            elif key in ("top_k", "explain"):
                settings[key] = value
    finally:
        await form.close()
    return uploads, settings


async def read_uploads(
    content_type: str, body: bytes, headers: Any, limits: Limits
) -> tuple[list[Upload], dict[str, Any]]:
    """The images of a request and its settings, by its content type."""
    if not body:
        raise BadRequest(400, f"the request body is empty: {HOW_TO_SEND}")
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        uploads, settings = await multipart_uploads(headers, body)
    elif kind == "application/json":
        uploads, settings = json_uploads(body)
    elif kind.startswith("image/") or kind == "application/octet-stream":
        uploads, settings = [Upload("<body>", body)], {}
    else:
        raise BadRequest(415, f"unsupported content type {kind or '(none)'!r}: {HOW_TO_SEND}")
    if not uploads:
        raise BadRequest(400, f"the request holds no image: {HOW_TO_SEND}")
    if len(uploads) > limits.max_images:
        raise BadRequest(
            413, f"{len(uploads)} images in one request; at most max_images={limits.max_images}: "
            "split them over several requests",
        )  # fmt: skip
    return uploads, settings


def open_image(upload: Upload, limits: Limits) -> Image.Image:
    """The upload decoded to RGB as ``tl-predict`` decodes a file (EXIF orientation, 16-bit,
    transparency: :func:`transfer_learning.data.images.decode`), after its header showed a size
    within ``max_pixels``."""
    name = upload.name
    if not upload.data:
        raise BadRequest(400, f"{name}: the file is empty (0 bytes)")
    bomb = BadRequest(
        413, f"{name}: the image is larger than max_pixels={limits.max_pixels} pixels "
        "(a decompression bomb, or a photo to shrink before sending)",
    )  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(upload.data)) as probe:
                width, height = probe.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bomb from None
    except UnidentifiedImageError:
        raise BadRequest(400, f"{name}: not an image file PIL can read (JPEG, PNG, WebP, ...)") from None
    except Exception as exc:
        raise BadRequest(400, f"{name}: cannot read the image: {problem(exc)}") from None
    if width * height > limits.max_pixels:
        raise bomb
    if min(width, height) < 1:
        raise BadRequest(400, f"{name}: empty image (0 pixels)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode(upload.data, name)
    except Exception as exc:  # truncated, corrupt
        raise BadRequest(400, f"{name}: cannot decode the image: {problem(exc)}") from None
