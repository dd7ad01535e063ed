"""Per-key and per-address rate limits on the /v1 API (Flask-Limiter), answered with 429 + Retry-After.

Off unless GATEWAY_RATE_LIMIT is set, e.g. "20/second;600/minute" (every limit must hold). A request
with a valid API key counts against its key's name (all of that client's keys and addresses
together); any other request counts against its client address. The limits are shared by all /v1
routes; the page, the spec and the probes are not limited.

The client address is the socket's peer, unless the peer is a trusted proxy (GATEWAY_TRUSTED_PROXIES,
e.g. the nginx in front): then it is the right-most X-Forwarded-For entry that is not a trusted
proxy. Nothing else may set it, or any client could pick a fresh address per request.

Storage (GATEWAY_RATE_LIMIT_STORAGE): `memory://` (the default) keeps the counters in each gunicorn
worker, so with N workers a client can get up to N times the limit from one pod (each worker counts
only what it served), and M replicas multiply that again. A shared store such as
`redis://HOST:6379` (the `redis` extra) makes the limit exact across workers and replicas. A shared
store must not become the gateway's single point of failure: each call to it times out after
STORE_TIMEOUT_S, and while it does not answer every worker limits on its own, in memory (Flask-
Limiter's in-memory fallback, logged as "Rate limit storage unreachable"), trying the store again
after 1, 2, 4 ... 32 s; requests are never failed because the store is down. The gauge
gateway_rate_limit_store_fallback is 1 meanwhile (alert on it: limits are then per worker).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Sequence

from flask import Flask, Response, current_app, g, request
from flask_limiter import Limiter, RateLimitExceeded
from limits.errors import ConfigurationError

from serving import metrics
from serving.config import ConfigError, IPNetwork, Settings
from serving.errors import GatewayError

EXTENSION_KEY = "gateway.limiter"
# moving-window: at most N requests in any window of the period, so a client cannot send 2N across a
# fixed window's boundary, and Retry-After is the time until its oldest counted request expires.
STRATEGY = "moving-window"
# Connect and read timeout of each call to a Redis store: a check costs ~1 ms on a healthy store, and
# a store that stopped answering must not hold requests for the TCP timeout (minutes) before the
# in-memory fallback takes over.
STORE_TIMEOUT_S = 0.5


def client_address(remote_addr: str | None, forwarded_for: str, trusted: Sequence[IPNetwork]) -> str:
    """The client's address, believing X-Forwarded-For only as far as it was written by trusted proxies."""
    address = remote_addr or "unknown"
    if not trusted:
        return address
    hops = [part.strip() for part in forwarded_for.split(",") if part.strip()]
    # Walk from the peer towards the client: each trusted proxy vouches for the entry before it.
    while _is_trusted(address, trusted) and hops:
        address = hops.pop()
    return address


def _is_trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # a name or garbage in X-Forwarded-For is nobody's proxy
    return any(ip in network for network in trusted)


def install(app: Flask, settings: Settings, *, applies: Callable[[], bool]) -> Limiter | None:
    """Limit the requests for which `applies()` is true, keyed on g.api_key_name or the address.

    serving/auth.py calls this between its identify and enforce steps.
    """
    if not settings.rate_limit:
        return None
    trusted = settings.trusted_proxies

    def limit_key() -> str:
        name = g.get("api_key_name")
        if name:
            return f"key:{name}"
        return "addr:" + client_address(
            request.remote_addr, request.headers.get("X-Forwarded-For", ""), trusted
        )

    storage = settings.rate_limit_storage
    timeouts = {"socket_timeout": STORE_TIMEOUT_S, "socket_connect_timeout": STORE_TIMEOUT_S}
    try:
        limiter = Limiter(
            limit_key,
            app=app,
            application_limits=[settings.rate_limit],
            storage_uri=storage,
            storage_options=timeouts if storage.startswith(("redis://", "rediss://")) else {},
            # A shared store that fails: per-worker limits in memory until it answers again.
            in_memory_fallback_enabled=not storage.startswith("memory://"),
            strategy=STRATEGY,
            # Retry-After is written by _too_many below; Flask-Limiter's own rounds down to 0 s.
            headers_enabled=False,
            key_prefix="gateway",
        )
    except ConfigurationError as error:
        raise ConfigError(
            f"GATEWAY_RATE_LIMIT_STORAGE={storage!r} cannot be used: {error} (for redis://, install "
            "the gateway with its `redis` extra: pip install '.[redis]')"
        ) from None
    limiter.request_filter(lambda: not applies())
    app.extensions[EXTENSION_KEY] = limiter
    if not storage.startswith("memory://"):

        @app.after_request
        def _store_state(response: Response) -> Response:
            # Limiter.limiter is the in-memory fallback's while the store is considered down.
            in_memory = limiter.limiter.storage is not limiter.storage
            metrics.RATE_LIMIT_STORE_FALLBACK.set(1 if in_memory else 0)
            return response

    def _too_many(error: RateLimitExceeded) -> Response:
        current = limiter.current_limit
        # window[0]: when the oldest request this limit counts expires (RequestLimit.reset_at adds a
        # second on top).
        wait = max(1, math.ceil(current.window[0] - time.time())) if current is not None else 1
        name = g.get("api_key_name")
        metrics.RATE_LIMITED.labels(key_name=name or "-").inc()
        who = f"API key {name!r}" if name else "client address"
        # Through the GatewayError handler, so the body has the gateway's error shape.
        return current_app.handle_user_exception(
            GatewayError(
                429,
                "rate_limited",
                f"too many requests: this gateway allows {settings.rate_limit} per {who}; "
                f"retry after {wait} s",
                headers={"Retry-After": str(wait)},
            )
        )

    app.register_error_handler(RateLimitExceeded, _too_many)
    return limiter
