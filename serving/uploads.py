"""Reading a request: its images (multipart files or one raw body), its parameters, and the model
input batch the images become.

/v1/predict and /v1/explain both read requests through here, so they accept the same requests and
refuse bad ones with the same errors.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from flask import request

from contract.preprocess import to_model_input
from serving import metrics
from serving.context import settings
from serving.errors import GatewayError
from serving.images import decode_image

UPLOAD_FIELD = "images"  # documented field name; any file field is accepted
MULTIPART = "multipart/form-data"
_CHUNK_BYTES = 256 * 1024


class Upload(NamedTuple):
    filename: str
    data: bytes


def param(name: str, content_type: str) -> str | None:
    """An optional request parameter: from the query string, else from a multipart form field."""
    raw = request.args.get(name)
    if raw is None and content_type == MULTIPART:
        raw = request.form.get(name)
    return raw


def read_uploads(content_type: str) -> list[Upload]:
    """Every image in the request: multipart files, or one raw image body.

    `content_type` is the request's mimetype, parsed once by the caller (Werkzeug re-parses the
    header on every access).
    """
    if content_type == MULTIPART:
        return _form_uploads()
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


def _form_uploads() -> list[Upload]:
    files = [f for _, f in request.files.items(multi=True)]
    if not files:
        raise GatewayError(
            400,
            "no_file",
            f"the form has no file; attach one or more images in the {UPLOAD_FIELD!r} field",
        )
    _check_count(len(files))  # before reading the parts into memory
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


def _check_count(count: int) -> None:
    max_images = settings().max_images
    if count > max_images:
        raise GatewayError(
            400,
            "too_many_images",
            f"{count} images in one request, over the limit {max_images}; split them into smaller requests",
        )


def model_inputs(uploads: list[Upload]) -> np.ndarray:
    """Decode every upload into one uint8 [N, 32, 32, 3] batch (errors name the offending file)."""
    max_pixels = settings().max_pixels
    batch = np.stack(
        [to_model_input(decode_image(u.data, filename=u.filename, max_pixels=max_pixels)) for u in uploads]
    )
    metrics.IMAGES_PER_REQUEST.observe(len(uploads))
    return batch
