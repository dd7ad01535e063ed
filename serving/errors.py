"""Every failure becomes a JSON body {"error": {"code": stable_code, "message": text with the fix}}.

Codes are stable (clients branch on them); messages are for people. No traceback reaches a client:
unexpected exceptions are logged here and answered with a generic 500.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from serving import metrics

log = logging.getLogger(__name__)

# Werkzeug's own HTTP errors (routing, size limit) mapped to our stable codes.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "upload_too_large",
    415: "unsupported_media_type",
}


class GatewayError(Exception):
    """An error with an HTTP status, a stable code and a message that tells the client the fix."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    metrics.ERRORS.labels(code=code).inc()
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask, *, max_upload_bytes: int) -> None:
    @app.errorhandler(GatewayError)
    def _gateway_error(error: GatewayError) -> Response:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _HTTP_CODES.get(status, f"http_{status}")
        if status == 413:
            message = (
                f"the request body is larger than the limit of {max_upload_bytes} bytes; "
                "send fewer or smaller images per request (GATEWAY_MAX_UPLOAD_BYTES sets the limit)"
            )
        else:
            message = error.description or error.name
        return error_response(status, code, message)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(
            500, "internal_error", "the gateway failed unexpectedly; the error is logged; try again later"
        )
