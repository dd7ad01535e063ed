"""The end-to-end deadline of a request (GATEWAY_REQUEST_DEADLINE_S).

`start()` runs before every request and fixes `g.deadline`; the request steps call `remaining_s()`
between pieces of work (before each upload is decoded, before the backend call), so a request that
ran out of time stops working instead of finishing an answer nobody waits for, and the backend call
gets only the time that is left (serving/backend_call.py passes it as `timeout_s`).

A single decode is not interrupted: the per-image pixel cap (serving/images.py) bounds how long one
can take, so the deadline is overrun by at most one image's decode.
"""

from __future__ import annotations

import time

from flask import Flask, g

from serving.context import settings
from serving.errors import GatewayError

CODE = "deadline_exceeded"


def start() -> None:
    """Fix this request's deadline: now + Settings.request_deadline_s (monotonic clock)."""
    g.deadline = time.monotonic() + settings().request_deadline_s


def remaining_s() -> float:
    """Seconds left before this request's deadline; a 504 `deadline_exceeded` once there are none.

    Outside a request that went through `start()` (e.g. a step called from a test), the whole
    configured deadline is left.
    """
    deadline = g.get("deadline")
    if deadline is None:
        return settings().request_deadline_s
    left = deadline - time.monotonic()
    if left <= 0:
        raise exceeded()
    return left


def exceeded() -> GatewayError:
    """The 504 `deadline_exceeded` error, for a step that ran out of time waiting (e.g. for a slot)."""
    limit = settings().request_deadline_s
    return GatewayError(
        504,
        CODE,
        f"the request did not finish within its deadline of {limit:g} s "
        "(GATEWAY_REQUEST_DEADLINE_S); send fewer or smaller images per request, or retry later",
    )


def install(app: Flask) -> None:
    """Start each request's clock before any other work on it."""
    app.before_request(start)
