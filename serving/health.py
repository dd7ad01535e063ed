"""/healthz (the process answers) and /readyz (a model version is loaded and answering)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from serving.context import backend

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    status = backend().status()
    body = {
        "ready": status.ready,
        "model": status.model_name,
        "version": status.version,
        "detail": status.detail,
        # Newer versions that failed to load while this one keeps serving: {"2": "error"}.
        "failed_versions": {str(v): error for v, error in status.failed_versions.items()},
    }
    return jsonify(body), (200 if status.ready else 503)
