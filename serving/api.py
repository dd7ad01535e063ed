"""/v1/predict and /v1/models."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.datastructures import FileStorage

from serving import metrics
from serving.backends.base import Backend, BackendError, BackendTimeout, BackendUnavailable, Prediction
from serving.config import Settings
from serving.errors import GatewayError
from serving.images import decode_image
from serving.model_card import card_summary
from serving.preprocess import INPUT_SIZE, to_model_input

bp = Blueprint("api", __name__, url_prefix="/v1")

DEFAULT_TOP_K = 5
UPLOAD_FIELD = "images"  # documented field name; any file field is accepted


def _settings() -> Settings:
    return current_app.extensions["gateway.settings"]


def _backend() -> Backend:
    return current_app.extensions["gateway.backend"]


def _uploads(content_type: str) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every image in the request: multipart files, or one raw image body."""
    if content_type == "multipart/form-data":
        files: list[FileStorage] = [f for _, f in request.files.items(multi=True)]
        if not files:
            raise GatewayError(
                400,
                "no_file",
                f"the form has no file; attach one or more images in the {UPLOAD_FIELD!r} field",
            )
        _check_count(len(files))  # before reading the parts into memory
        uploads = [(f.filename or f"image-{i}", f.read()) for i, f in enumerate(files)]
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        uploads = [(request.headers.get("X-Filename", "upload"), _raw_body())]
    elif not content_type and not request.content_length:
        raise GatewayError(
            400,
            "no_file",
            f"the request has no image; POST multipart/form-data with an {UPLOAD_FIELD!r} field",
        )
    else:
        raise GatewayError(
            415,
            "unsupported_media_type",
            f"content type {content_type!r} is not accepted; send multipart/form-data with an "
            f"{UPLOAD_FIELD!r} field, or one image as the body with an image/* content type",
        )
    return uploads


def _raw_body() -> bytes:
    if request.content_length is not None:
        return request.get_data(cache=False)  # Werkzeug already refused a length over the limit
    # Chunked upload, no length to check: a single read() of Werkzeug's limited stream stops
    # silently at the limit (a truncated image), whereas reading on past the limit raises 413.
    chunks = []
    while chunk := request.stream.read(256 * 1024):
        chunks.append(chunk)
    return b"".join(chunks)


def _check_count(count: int) -> None:
    max_images = _settings().max_images
    if count > max_images:
        raise GatewayError(
            400,
            "too_many_images",
            f"{count} images in one request, over the limit {max_images}; split them into smaller requests",
        )


def _param(name: str, content_type: str) -> str | None:
    """An optional request parameter: from the query string, else from a multipart form field."""
    raw = request.args.get(name)
    if raw is None and content_type == "multipart/form-data":
        raw = request.form.get(name)
    return raw


def _top_k(content_type: str) -> int:
    raw = _param("top_k", content_type)
    if raw is None or raw == "":
        return DEFAULT_TOP_K
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise GatewayError(
            400, "invalid_top_k", f"top_k={raw!r} is not valid: use an integer from 1 to the class count"
        )
    return value


def _model_inputs(uploads: list[tuple[str, bytes]]) -> np.ndarray:
    """Decode every upload into one uint8 [N, 32, 32, 3] batch (errors name the offending file)."""
    max_pixels = _settings().max_pixels
    batch = np.stack(
        [to_model_input(decode_image(data, filename=name, max_pixels=max_pixels)) for name, data in uploads]
    )
    metrics.IMAGES_PER_REQUEST.observe(len(uploads))
    return batch


def _call_backend(batch: np.ndarray, method: str = "predict", **kwargs: Any) -> Any:
    """backend.<method>(batch, **kwargs) with backend failures mapped to 502/503/504 (method:
    predict, explain)."""
    backend = _backend()
    start = time.perf_counter()
    try:
        return getattr(backend, method)(batch, **kwargs)
    except BackendUnavailable as error:
        raise GatewayError(
            503,
            "backend_unavailable",
            f"the model is not available right now ({error}); retry after a moment",
            headers={"Retry-After": str(error.retry_after_s)},
        ) from None
    except BackendTimeout as error:
        raise GatewayError(
            504, "backend_timeout", f"{error}; retry, or send fewer images per request"
        ) from None
    except BackendError as error:
        raise GatewayError(502, "backend_error", f"the model backend failed: {error}") from None
    finally:
        metrics.BACKEND_SECONDS.labels(backend=backend.kind).observe(time.perf_counter() - start)


def _check_top_k(top_k: int, names: tuple[str, ...]) -> None:
    if top_k > len(names):
        raise GatewayError(
            400,
            "invalid_top_k",
            f"top_k={top_k} is more than the {len(names)} classes; use 1 to {len(names)}",
        )


def _scores(row: np.ndarray, names: tuple[str, ...], top_k: int) -> dict[str, Any]:
    """The `top_k` list (best first) and every class's probability, for one image."""
    order = np.argsort(-row, kind="stable")[:top_k]
    return {
        "top_k": [{"label": names[i], "probability": float(row[i])} for i in order],
        "probabilities": {name: float(p) for name, p in zip(names, row, strict=True)},
    }


@bp.post("/predict")
def predict() -> Response:
    content_type = request.mimetype  # parsed once: Werkzeug re-parses the header on every access
    top_k = _top_k(content_type)
    uploads = _uploads(content_type)
    batch = _model_inputs(uploads)
    prediction: Prediction = _call_backend(batch)
    names = prediction.class_names
    _check_top_k(top_k, names)
    results = [
        {"filename": filename, **_scores(row, names, top_k)}
        for (filename, _), row in zip(uploads, prediction.probabilities, strict=True)
    ]
    return jsonify(
        {
            "model": {"name": prediction.model_name, "version": prediction.model_version},
            "predictions": results,
        }
    )


@bp.get("/models")
def models() -> Response:
    status = _backend().status()
    if not status.ready:
        raise GatewayError(
            503,
            "backend_unavailable",
            f"model {status.model_name!r} is not available: {status.detail}; retry after a moment",
            headers={"Retry-After": "1"},
        )
    return jsonify(
        {
            "name": status.model_name,
            "version": status.version,
            "class_names": list(status.class_names or ()),
            "input_size": [INPUT_SIZE, INPUT_SIZE, 3],
            "backend": _backend().kind,
            # What the version was trained on (null when the gateway cannot see the model base).
            "model_card": card_summary(_settings().model_base_path, status.model_name, status.version),
        }
    )
