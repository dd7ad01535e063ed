"""/v1/predict and /v1/models."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from contract.signatures import INPUT_SIZE
from serving import drift_metrics, request_id, sampling
from serving.backend_call import call_backend
from serving.context import backend, settings
from serving.errors import GatewayError
from serving.model_card import card_summary
from serving.ranking import check_top_k, requested_top_k, scores, trust
from serving.uploads import model_inputs, read_uploads

bp = Blueprint("api", __name__, url_prefix="/v1")


@bp.post("/predict")
def predict() -> Response:
    content_type = request.mimetype  # parsed once: Werkzeug re-parses the header on every access
    top_k = requested_top_k(content_type)
    uploads = read_uploads(content_type)
    batch = model_inputs(uploads)
    prediction = call_backend(backend().predict, batch)
    names = prediction.class_names
    check_top_k(top_k, names)
    results = [
        {
            "filename": upload.filename,
            **scores(row, names, top_k),
            **trust(prediction.ood_score, prediction.abstain, index),
        }
        for index, (upload, row) in enumerate(zip(uploads, prediction.probabilities, strict=True))
    ]
    # Answered: keep it in the prediction sample (when GATEWAY_SAMPLE_RATE says so) and count it in
    # the drift metrics. Neither raises, so neither can fail the request it observes.
    sampling.record(batch, prediction, request_id.current())
    drift_metrics.observe(prediction)
    return jsonify(
        {
            "model": {"name": prediction.model_name, "version": prediction.model_version},
            "predictions": results,
        }
    )


@bp.get("/models")
def models() -> Response:
    status = backend().status()
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
            "backend": backend().kind,
            # labels.json as this gateway applies it (stable, canary, share, mode); null without one.
            "rollout": status.rollout,
            # What the version was trained on (null when the gateway cannot see the model base).
            "model_card": card_summary(settings().model_base_path, status.model_name, status.version),
        }
    )
