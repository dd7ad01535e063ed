"""Reading a request: its images (multipart files or one raw body), its parameters, and the model
input batch the images become.

/v1/predict and /v1/explain both read requests through here, so they accept the same requests and
refuse bad ones with the same errors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from flask import current_app, request

from contract.preprocess import to_model_input
from serving import metrics
from serving.context import settings
from serving.deadline import exceeded, remaining_s
from serving.errors import GatewayError
from serving.images import decode_opened, open_image

UPLOAD_FIELD = "images"  # documented field name; any file field is accepted
MULTIPART = "multipart/form-data"
_CHUNK_BYTES = 256 * 1024
DECODE_SLOTS_KEY = "gateway.decode_slots"  # app.extensions: this worker's decode semaphore
_slots_lock = threading.Lock()


class Upload(NamedTuple):
    filename: str
    data: bytes


def param(name: str, content_type: str) -> str | None:
    """An optional request parameter: from the query string, else from a multipart form field."""
    raw = request.args.get(name)
    if raw is None and content_type == MULTIPART:
        raw = request.form.get(name)
    return raw


def read_uploads(content_type: str, *, max_images: int | None = None) -> list[Upload]:
    """Every image in the request: multipart files, or one raw image body.

    `content_type` is the request's mimetype, parsed once by the caller (Werkzeug re-parses the
    header on every access). `max_images` caps the count (default Settings.max_images; /v1/explain
    passes its own, lower cap).
    """
    if content_type == MULTIPART:
        return _form_uploads(max_images or settings().max_images)
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [Upload(request.headers.get("X-Filename", "upload"), _raw_body())]
    if not content_type and not request.content_length:
        raise GatewayError(
            400,
            "no_file",
            f"the request has no image; POST multipart/form-data with an {UPLOAD_FIELD!r} field",
        )
    raise GatewayError(
        415,
        "unsupported_media_type",
        f"content type {content_type!r} is not accepted; send multipart/form-data with an "
        f"{UPLOAD_FIELD!r} field, or one image as the body with an image/* content type",
    )


def _form_uploads(max_images: int) -> list[Upload]:
    files = [f for _, f in request.files.items(multi=True)]
    if not files:
        raise GatewayError(
            400,
            "no_file",
            f"the form has no file; attach one or more images in the {UPLOAD_FIELD!r} field",
        )
    _check_count(len(files), max_images)  # before reading the parts into memory
    return [Upload(f.filename or f"image-{i}", f.read()) for i, f in enumerate(files)]


def _raw_body() -> bytes:
    if request.content_length is not None:
        return request.get_data(cache=False)  # Werkzeug already refused a length over the limit
    # Chunked upload, no length to check: a single read() of Werkzeug's limited stream stops
    # silently at the limit (a truncated image), whereas reading on past the limit raises 413.
    chunks = []
    while chunk := request.stream.read(_CHUNK_BYTES):
        chunks.append(chunk)
    return b"".join(chunks)


def _check_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise GatewayError(
            400,
            "too_many_images",
            f"{count} images in one request, over the limit {max_images}; split them into smaller requests",
        )


def model_inputs(uploads: list[Upload]) -> np.ndarray:
    """Decode every upload into one uint8 [N, 32, 32, 3] batch (errors name the offending file).

    Every header is read and checked first, and the declared pixels of all images together against
    Settings.max_request_pixels, so an over-budget request is refused before any pixel is decoded.
    Then the images are decoded one at a time, each reduced to 32x32 and dropped before the next, so
    a request holds one full-size image at a time; the request deadline is checked before each.
    """
    config = settings()
    opened = [open_image(u.data, filename=u.filename, max_pixels=config.max_pixels) for u in uploads]
    total = sum(image.width * image.height for image in opened)
    if total > config.max_request_pixels:
        raise GatewayError(
            413,
            "request_too_many_pixels",
            f"the {len(uploads)} images of this request declare {total} pixels in all, over the limit of "
            f"{config.max_request_pixels} pixels per request (GATEWAY_MAX_REQUEST_PIXELS); send them in "
            "several requests, or downscale them first (the model sees 32x32 anyway)",
        )
    rows = []
    for index, upload in enumerate(uploads):
        image, opened[index] = opened[index], None  # drop our reference: freed once reduced
        with _decode_slot():  # a 504 once the deadline passed: no decoding for an abandoned answer
            rows.append(to_model_input(decode_opened(image, filename=upload.filename)))
        del image
    metrics.IMAGES_PER_REQUEST.observe(len(uploads))
    return np.stack(rows)


def _decode_slots() -> threading.BoundedSemaphore:
    """This app's (i.e. this worker's) decode semaphore, made on first use."""
    extensions = current_app.extensions
    slots = extensions.get(DECODE_SLOTS_KEY)
    if slots is None:
        with _slots_lock:
            slots = extensions.get(DECODE_SLOTS_KEY)
            if slots is None:
                slots = extensions[DECODE_SLOTS_KEY] = threading.BoundedSemaphore(
                    settings().decode_concurrency
                )
    return slots


@contextmanager
def _decode_slot() -> Iterator[None]:
    """Hold one of the worker's Settings.decode_concurrency decode slots, waiting for one no longer
    than the request's deadline allows (then 504 `deadline_exceeded`).

    Full-size pixels exist only while a slot is held, so a worker holds at most that many decoded
    images whatever its thread count: the bound docs/deploy.md sizes the pod's memory from.
    """
    slots = _decode_slots()
    if not slots.acquire(timeout=remaining_s()):
        raise exceeded()
    try:
        yield
    finally:
        slots.release()
