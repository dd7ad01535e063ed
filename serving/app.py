"""The gateway's app factory: `gunicorn -c serving/gunicorn.conf.py 'serving.app:create_app()'`.

Settings are read from the environment here, once per process, never at import time; under
gunicorn each worker calls the factory after the fork, so the model, its poller thread and any
gRPC channel belong to that worker.
"""

from __future__ import annotations

import atexit
import json
import time
from pathlib import Path

import yaml
from flask import Flask, Response, g, request, send_from_directory

from serving import admin, api, auth, context, deadline, explain, health, metrics, request_id, tracing
from serving.backends.base import Backend
from serving.config import Settings
from serving.errors import register_error_handlers

PACKAGE_DIR = Path(__file__).resolve().parent


def make_backend(settings: Settings) -> Backend:
    if settings.tfserving_address:
        from serving.backends.tfserving import TFServingBackend

        return TFServingBackend(
            settings.tfserving_address,
            settings.model_name,
            signature_name=settings.tfserving_signature,
            deadline_s=settings.deadline_s,
            tls_ca=settings.tfserving_tls_ca,
            tls_cert=settings.tfserving_tls_cert,
            tls_key=settings.tfserving_tls_key,
            breaker_failures=settings.breaker_failures,
            breaker_open_s=settings.breaker_open_s,
            retry_budget_ratio=settings.retry_budget_ratio,
            # labels.json (stable/canary, serving/canary.py) sits in the model volume TF Serving reads.
            labels_dir=settings.model_base_path / settings.model_name,
            poll_interval_s=settings.poll_interval_s,
        )
    from serving.backends.embedded import EmbeddedBackend

    return EmbeddedBackend(
        settings.model_base_path,
        settings.model_name,
        poll_interval_s=settings.poll_interval_s,
        deadline_s=settings.deadline_s,
        batching=settings.batching,
        runtime=settings.runtime,
        model_threads=settings.model_threads,
        litert_cache_dir=settings.litert_cache_dir,
    )


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> Flask:
    """Build the gateway. `backend` replaces the one the settings select (tests, embedding)."""
    settings = settings or Settings.from_env()
    app = Flask(__name__, static_folder=None)
    # Werkzeug refuses a larger Content-Length with 413 before reading the body, and stops
    # reading a chunked body at the limit.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.json.sort_keys = False  # keep probabilities in class order and top-k in rank order
    backend = backend or make_backend(settings)
    atexit.register(backend.close)
    context.install(app, settings, backend)
    # First of the before_requests: everything after it (and its errors) can name the request id.
    request_id.install(app)
    # Off by default; with tracing on, a span per request, children per gRPC call (serving/tracing.py).
    tracing.install(app, settings)
    deadline.install(app)  # the request deadline starts here (serving/deadline.py)
    admin.install(app, settings)  # /metrics, /readyz on GATEWAY_ADMIN_BIND only (serving/admin.py)

    register_error_handlers(app, max_upload_bytes=settings.max_upload_bytes)
    auth.install(app, settings)  # API keys, then rate limits, on /v1 (serving/auth.py, ratelimit.py)
    app.register_blueprint(api.bp)
    app.register_blueprint(explain.bp)  # POST /v1/explain (Grad-CAM)
    app.register_blueprint(health.bp)
    _register_pages(app)
    _register_request_metrics(app)
    return app


def _register_pages(app: Flask) -> None:
    static_dir = PACKAGE_DIR / "static"
    spec_path = PACKAGE_DIR / "openapi.yaml"

    @app.get("/")
    def index() -> Response:
        return send_from_directory(static_dir, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name: str) -> Response:
        return send_from_directory(static_dir, name)

    @app.get("/openapi.yaml")
    def openapi_yaml() -> Response:
        return Response(spec_path.read_text(), mimetype="application/yaml")

    @app.get("/v1/openapi.json")
    def openapi_json() -> Response:
        return Response(json.dumps(yaml.safe_load(spec_path.read_text())), mimetype="application/json")

    @app.get("/metrics")
    def metrics_view() -> Response:
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)


def _register_request_metrics(app: Flask) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.request_start = time.perf_counter()

    @app.after_request
    def _record(response: Response) -> Response:
        # The rule, not the path, so unknown URLs do not grow the label set without bound.
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.REQUESTS.labels(route=route, method=request.method, status=str(response.status_code)).inc()
        start = g.get("request_start")
        if start is not None:
            metrics.REQUEST_SECONDS.labels(route=route).observe(time.perf_counter() - start)
        return response
