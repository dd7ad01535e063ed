"""POST /v1/explain: the top classes of each uploaded image and a Grad-CAM overlay PNG of why.

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


def _explain(batch) -> Explanation:  # noqa: ANN001 - uint8 [N, 32, 32, 3]
    if not callable(getattr(api._backend(), "explain", None)):
        raise GatewayError(
            501,
            "explain_unsupported",
            "this gateway's model backend cannot explain predictions; use /v1/predict",
        )
    try:
        return api._call_backend(batch, method="explain")
    except ExplainUnsupported as error:  # not a BackendError: api's 502 mapping lets it through
        raise GatewayError(501, "explain_unsupported", str(error)) from None


@bp.post("/explain")
def explain() -> Response:
    content_type = request.mimetype  # parsed once, as in api.predict
    top_k = api._top_k(content_type)
    uploads = api._uploads(content_type)
    batch = api._model_inputs(uploads)
    explanation = _explain(batch)
    names = explanation.class_names
    api._check_top_k(top_k, names)
    results = []
    for index, ((filename, _), row) in enumerate(zip(uploads, explanation.probabilities, strict=True)):
        explained = int(explanation.explained_class[index])
        if not 0 <= explained < len(names):
            raise GatewayError(502, "backend_error", f"the model explained class {explained} of {len(names)}")
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
