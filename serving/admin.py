"""The admin port: /metrics and /readyz answer only on GATEWAY_ADMIN_BIND, /healthz on both ports.

Why: the public port is for clients (through nginx in the shipped stacks); metrics name routes,
error codes and model versions, and readiness says when the pod can be knocked over. On a port of
their own, a NetworkPolicy (k8s/networkpolicy.yaml) lets only Prometheus and the kubelet reach
them, and the probes do not queue behind public traffic. gunicorn listens on both addresses
(serving/gunicorn.conf.py adds the admin one); this module tells the two apart by the port the
connection really arrived on, never by a header a client could write (Host, X-Forwarded-*).

With GATEWAY_ADMIN_BIND unset (`make serve` on 127.0.0.1, the tests) nothing changes: every route
answers on the one port.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request
from werkzeug.exceptions import NotFound

from serving.config import Settings

ADMIN_ONLY = frozenset({"/metrics", "/readyz"})
BOTH_PORTS = frozenset({"/healthz"})


def local_port(environ: dict[str, Any]) -> int | None:
    """The local TCP port this request's connection arrived on (None on a unix socket)."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if sock is not None:
        try:
            name = sock.getsockname()
        except OSError:
            return None
        return name[1] if isinstance(name, tuple) else None
    # Test clients have no socket; SERVER_PORT is what they were told to use.
    port = str(environ.get("SERVER_PORT", ""))
    return int(port) if port.isdigit() else None


def on_admin_port() -> bool:
    """Whether the current request came in on the admin port (False when there is none)."""
    port = request.environ.get("serving.admin_port")
    return port is not None and local_port(request.environ) == port


def install(app: Flask, settings: Settings) -> None:
    """Answer 404 for admin routes on the public port and for public routes on the admin port."""
    admin_port = settings.admin_port
    if admin_port is None:
        return

    @app.before_request
    def _split_ports() -> None:
        request.environ["serving.admin_port"] = admin_port
        path = request.path
        if on_admin_port():
            if path not in ADMIN_ONLY | BOTH_PORTS:
                # The API is served on the public port only, behind the proxy and its limits.
                raise NotFound()
        elif path in ADMIN_ONLY:
            # The same answer as any unknown URL: the public port does not say the admin routes exist.
            raise NotFound()
