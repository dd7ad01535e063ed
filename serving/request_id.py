"""A request id for every request: in `g.request_id`, the `X-Request-ID` response header, every error
body and the gateway's log lines about the request.

An incoming `X-Request-ID` (set by a proxy or the client) is kept when it is valid
(contract/request_id.py: 1..64 characters of [A-Za-z0-9._-]), so one id follows a call through
nginx, the gateway and the client's own logs; any other value (too long, spaces, control characters
that could forge log lines) is replaced by a fresh uuid4 hex. Error bodies carry the id instead of
internals: an operator finds the details in the log by the id the client reports.
"""

from __future__ import annotations

from flask import Flask, Response, g, has_request_context, request

from contract.request_id import HEADER, is_valid, new_id

__all__ = ["HEADER", "current", "install"]


def _choose(incoming: str | None) -> str:
    if is_valid(incoming):
        return incoming
    return new_id()


def current() -> str | None:
    """This request's id; None outside a request (a background thread, app start-up)."""
    if not has_request_context():
        return None
    if "request_id" not in g:  # an error raised before our before_request ran (e.g. routing)
        g.request_id = _choose(request.headers.get(HEADER))
    return g.request_id


def install(app: Flask) -> None:
    """Register the id's before_request and after_request on app; call before other before_requests
    so that everything later (deadline, auth, rate limits, their errors) can use current()."""

    @app.before_request
    def _assign() -> None:
        g.request_id = _choose(request.headers.get(HEADER))

    @app.after_request
    def _echo(response: Response) -> Response:
        request_id = current()
        if request_id is not None:
            response.headers[HEADER] = request_id
        return response
