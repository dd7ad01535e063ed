"""Every failure becomes a JSON body {"error": {"code", "message", "request_id"}}.

Codes are stable (clients branch on them); messages are for people and say the fix. Bodies never
carry internals: no addresses, peer IPs, file paths, gRPC details or exception text. Those go to
the log line this module writes for every error, which carries the same request id as the body
and the X-Request-ID header (serving/request_id.py), so an operator finds them by the id a client
reports. Unexpected exceptions are logged with their traceback and answered with a generic 500.
"""

from __future__ import annotations

import logging
import re

from flask import Flask, Response, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from serving import metrics, request_id

log = logging.getLogger(__name__)

# Werkzeug's own HTTP errors (routing, size limit) mapped to our stable codes.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "upload_too_large",
    415: "unsupported_media_type",
}


# Defence in depth for 5xx bodies, whose messages may quote a backend's error: absolute file paths of
# two or more segments (not the API's own /v1/... routes) and IP addresses (with port, gRPC's
# "ipv4:" prefix, or a bracketed IPv6 literal) are replaced; the log line keeps the original.
_FS_PATH = re.compile(r"(?<![\w.:/])/(?!v1/)(?:[\w.@+-]+/)+[\w.@+-]*")
_ADDRESS = re.compile(r"(?:\bipv[46]:)?(?:\b\d{1,3}(?:\.\d{1,3}){3}\b|\[[0-9A-Fa-f:.]+\])(?::\d+)?")


def redact(text: str) -> str:
    """text with file paths and network addresses replaced by <path> and <address>."""
    return _ADDRESS.sub("<address>", _FS_PATH.sub("<path>", text))


class GatewayError(Exception):
    """An error with an HTTP status, a stable code and a message that tells the client the fix.

    `message` goes to the client: keep internals out of it. `detail` (addresses, paths, the
    backend's own error text) goes only to the log line, under the request id.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.detail = detail


def error_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    detail: str | None = None,
) -> Response:
    """The JSON error answer, counted and logged under this request's id (with `detail`, log only)."""
    metrics.ERRORS.labels(code=code).inc()
    rid = request_id.current()
    _log_error(status, code, message, detail, rid)
    if status >= 500:
        message = redact(message)
    response = jsonify({"error": {"code": code, "message": message, "request_id": rid}})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    if rid is not None:
        response.headers[request_id.HEADER] = rid
    return response


def _log_error(status: int, code: str, message: str, detail: str | None, rid: str | None) -> None:
    # Client mistakes (4xx) are routine: INFO. Server-side failures (5xx) are what operators look
    # for: WARNING, with the internal detail the body leaves out.
    where = f"{request.method} {request.path}" if has_request_context() else "-"
    log.log(
        logging.WARNING if status >= 500 else logging.INFO,
        "request_id=%s %s -> %d %s: %s%s",
        rid,
        where,
        status,
        code,
        message,
        f" [detail: {detail}]" if detail else "",
    )


def _detail_of(error: BaseException) -> str | None:
    """What a GatewayError raised `from None` while handling another exception hid: its text, for the
    log (e.g. a BackendUnavailable's message when a backend call failed)."""
    if isinstance(error, GatewayError) and error.detail:
        return error.detail
    context = error.__cause__ or error.__context__
    return f"{type(context).__name__}: {context}" if context is not None else None


def register_error_handlers(app: Flask, *, max_upload_bytes: int) -> None:
    @app.errorhandler(GatewayError)
    def _gateway_error(error: GatewayError) -> Response:
        detail = _detail_of(error) if error.status >= 500 else error.detail
        return error_response(error.status, error.code, error.message, error.headers, detail=detail)

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
        # The traceback and the exception's text go to the log only: they can name files, hosts
        # and values from the request.
        log.exception("request_id=%s unhandled error", request_id.current())
        return error_response(
            500,
            "internal_error",
            "the gateway failed unexpectedly; the error is logged under this request_id; try again later",
            detail=f"{type(error).__name__} (traceback logged above)",
        )
