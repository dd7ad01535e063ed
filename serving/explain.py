"""POST /v1/explain: the top classes of each uploaded image and a Grad-CAM overlay PNG of why.

The overlay explains the top class, or the class named by the optional `class` parameter (a class
name such as `cat`, or its index), which answers "what in this image looks like a cat?".

Uploads, limits, top_k and backend errors are handled by the same helpers as /v1/predict
(serving/api.py), so both endpoints accept the same requests and refuse bad ones identically.
The heatmap comes from the model's exported `explain` signature (trainer/export/gradcam.py),
whichever backend serves it; serving/overlay.py draws it over the 32x32 input the model saw.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from serving import api
from serving.backends.explain import ExplainUnsupported, Explanation
from serving.errors import GatewayError
from serving.overlay import VIEW_SIZE, overlay_png_base64

bp = Blueprint("explain", __name__, url_prefix="/v1")


CLASS_PARAM = "class"  # optional: explain this class (a name or an index) instead of the top one


def _requested_class(content_type: str) -> str | None:
    raw = api._param(CLASS_PARAM, content_type)
    return raw.strip() if raw is not None and raw.strip() else None


def _class_index(raw: str) -> int:
    """The index of the class named (or numbered) by `raw` in the served model's class names."""
    status = api._backend().status()
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


def _explain(batch, class_index: int | None) -> Explanation:  # noqa: ANN001 - uint8 [N, 32, 32, 3]
    if not callable(getattr(api._backend(), "explain", None)):
        raise GatewayError(
            501,
            "explain_unsupported",
            "this gateway's model backend cannot explain predictions; use /v1/predict",
        )
    try:
        return api._call_backend(batch, method="explain", class_index=class_index)
    except ExplainUnsupported as error:  # not a BackendError: api's 502 mapping lets it through
        raise GatewayError(501, "explain_unsupported", str(error)) from None


@bp.post("/explain")
def explain() -> Response:
    content_type = request.mimetype  # parsed once, as in api.predict
    top_k = api._top_k(content_type)
    uploads = api._uploads(content_type)
    batch = api._model_inputs(uploads)
    requested = _requested_class(content_type)
    class_index = None if requested is None else _class_index(requested)
    explanation = _explain(batch, class_index)
    names = explanation.class_names
    api._check_top_k(top_k, names)
    results = []
    for index, ((filename, _), row) in enumerate(zip(uploads, explanation.probabilities, strict=True)):
        explained = int(explanation.explained_class[index])
        if not 0 <= explained < len(names) or class_index not in (None, explained):
            raise GatewayError(
                502,
                "backend_error",
                f"the model explained class {explained} of {len(names)} (asked for {class_index})",
            )
        results.append(
            {
                "filename": filename,
                **api._scores(row, names, top_k),
                "explained_class": names[explained],
                "overlay_png": overlay_png_base64(batch[index], explanation.heatmaps[index]),
                "overlay_size": [VIEW_SIZE, VIEW_SIZE],
            }
        )
    return jsonify(
        {
            "model": {"name": explanation.model_name, "version": explanation.model_version},
            "explanations": results,
        }
    )
