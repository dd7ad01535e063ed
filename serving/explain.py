"""POST /v1/explain: the top classes of each uploaded image and a Grad-CAM overlay PNG of why.

The overlay explains the top class, or the class named by the optional `class` parameter (a class
name such as `cat`, or its index), which answers "what in this image looks like a cat?".

Uploads, limits, top_k and backend errors are handled by the same request steps as /v1/predict
(serving/uploads.py, ranking.py, backend_call.py), so both endpoints accept the same requests and
refuse bad ones identically.
The heatmap comes from the model's exported `explain` signature (trainer/export/gradcam.py),
whichever backend serves it; serving/overlay.py draws it over the 32x32 input the model saw.

An explanation costs several predictions (a backward pass, then a PNG per image), so explain has
budgets of its own: at most Settings.max_explain_images images a request (GATEWAY_MAX_EXPLAIN_IMAGES)
and at most Settings.explain_concurrency calls at once per worker (GATEWAY_EXPLAIN_CONCURRENCY); one
more gets 503 `explain_busy` with Retry-After at once, rather than queueing behind the others and
taking threads that /v1/predict and /healthz need.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState

from serving.backend_call import call_backend
from serving.backends.base import ExplainUnsupported, Explanation
from serving.context import SETTINGS_KEY, backend, settings
from serving.deadline import remaining_s
from serving.errors import GatewayError
from serving.overlay import VIEW_SIZE, overlay_png_base64
from serving.ranking import check_top_k, requested_top_k, scores, trust
from serving.uploads import Upload, model_inputs, param, read_uploads

bp = Blueprint("explain", __name__, url_prefix="/v1")


CLASS_PARAM = "class"  # optional: explain this class (a name or an index) instead of the top one
SLOTS_KEY = "gateway.explain_slots"  # app.extensions: this worker's explain semaphore
BUSY_RETRY_AFTER_S = 1


@bp.record
def _install_slots(state: BlueprintSetupState) -> None:
    # One semaphore per app, i.e. per gunicorn worker (the factory runs after the fork).
    state.app.extensions[SLOTS_KEY] = threading.BoundedSemaphore(
        state.app.extensions[SETTINGS_KEY].explain_concurrency
    )


@contextmanager
def _explain_slot() -> Iterator[None]:
    """Hold one of this worker's explain slots for the request; 503 `explain_busy` when none is free."""
    slots: threading.BoundedSemaphore = current_app.extensions[SLOTS_KEY]
    if not slots.acquire(blocking=False):
        limit = settings().explain_concurrency
        raise GatewayError(
            503,
            "explain_busy",
            f"this gateway worker is already computing {limit} explanations (GATEWAY_EXPLAIN_CONCURRENCY); "
            f"retry after {BUSY_RETRY_AFTER_S} s, or use /v1/predict for the scores alone",
            headers={"Retry-After": str(BUSY_RETRY_AFTER_S)},
        )
    try:
        yield
    finally:
        slots.release()


def _requested_class(content_type: str) -> str | None:
    raw = param(CLASS_PARAM, content_type)
    return raw.strip() if raw is not None and raw.strip() else None


def _class_index(raw: str) -> int:
    """The index of the class named (or numbered) by `raw` in the served model's class names."""
    status = backend().status()
    names = tuple(status.class_names or ())
    if not status.ready or not names:
        raise GatewayError(
            503,
            "backend_unavailable",
            f"the model is not available right now ({status.detail}); retry after a moment",
            headers={"Retry-After": "1"},
        )
    if raw in names:
        return names.index(raw)
    if raw.lstrip("-").isdigit() and 0 <= int(raw) < len(names):
        return int(raw)
    raise GatewayError(
        400,
        "invalid_class",
        f"{CLASS_PARAM}={raw!r} is not a class of this model; use one of {', '.join(names)} "
        f"or an index 0 to {len(names) - 1}, or leave it out to explain the top class",
    )


def _explain(batch: np.ndarray, class_index: int | None) -> Explanation:
    try:
        return call_backend(backend().explain, batch, class_index)
    except ExplainUnsupported as error:  # not a BackendError: call_backend's 502 mapping lets it through
        raise GatewayError(501, "explain_unsupported", str(error)) from None


def _explained_class(explanation: Explanation, index: int, class_index: int | None) -> int:
    """The class the backend says image `index`'s heatmap explains, checked against the request."""
    names = explanation.class_names
    explained = int(explanation.explained_class[index])
    if not 0 <= explained < len(names) or class_index not in (None, explained):
        raise GatewayError(
            502,
            "backend_error",
            f"the model explained class {explained} of {len(names)} (asked for {class_index})",
        )
    return explained


def _entry(
    explanation: Explanation,
    index: int,
    upload: Upload,
    pixels: np.ndarray,
    top_k: int,
    class_index: int | None,
) -> dict[str, Any]:
    """Image `index`'s answer: its scores, the explained class and the overlay of its heatmap."""
    names = explanation.class_names
    explained = _explained_class(explanation, index, class_index)
    return {
        "filename": upload.filename,
        **scores(explanation.probabilities[index], names, top_k),
        **trust(explanation.ood_score, explanation.abstain, index),
        "explained_class": names[explained],
        "overlay_png": overlay_png_base64(pixels, explanation.heatmaps[index]),
        "overlay_size": [VIEW_SIZE, VIEW_SIZE],
    }


@bp.post("/explain")
def explain() -> Response:
    content_type = request.mimetype  # parsed once, as in api.predict
    top_k = requested_top_k(content_type)
    with _explain_slot():  # held from decoding to the last overlay: all of it is explain's cost
        uploads = read_uploads(content_type, max_images=settings().max_explain_images)
        batch = model_inputs(uploads)
        requested = _requested_class(content_type)
        class_index = None if requested is None else _class_index(requested)
        explanation = _explain(batch, class_index)
        return _answer(explanation, uploads, batch, top_k, class_index)


def _answer(
    explanation: Explanation, uploads: list[Upload], batch: np.ndarray, top_k: int, class_index: int | None
) -> Response:
    check_top_k(top_k, explanation.class_names)
    results = []
    for index, (upload, _) in enumerate(zip(uploads, explanation.probabilities, strict=True)):
        remaining_s()  # past the deadline: stop drawing overlays nobody waits for (504)
        results.append(_entry(explanation, index, upload, batch[index], top_k, class_index))
    return jsonify(
        {
            "model": {"name": explanation.model_name, "version": explanation.model_version},
            "explanations": results,
        }
    )
