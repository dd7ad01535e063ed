"""Calling the model backend for a request: backend failures become 502/503/504 answers, and the
call's duration is recorded per backend kind."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from serving import metrics
from serving.backends.base import BackendError, BackendTimeout, BackendUnavailable
from serving.context import backend
from serving.deadline import remaining_s
from serving.errors import GatewayError

P = ParamSpec("P")
T = TypeVar("T")


def call_backend(method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`method(*args, **kwargs)`, a method of this app's backend (predict, explain), with its
    failures mapped to GatewayErrors. Other exceptions pass through unchanged."""
    kind = backend().kind
    start = time.perf_counter()
    try:
        # The backend gets what is left of the request's deadline (serving/deadline.py), a 504 when
        # nothing is.
        return method(*args, timeout_s=remaining_s(), **kwargs)
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
        metrics.BACKEND_SECONDS.labels(backend=kind).observe(time.perf_counter() - start)
