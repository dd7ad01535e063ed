"""Prometheus metrics for the gateway.

Under gunicorn every worker is a process, so prometheus-client runs in multiprocess mode: the
environment variable PROMETHEUS_MULTIPROC_DIR must be set before this module is first imported
(serving/gunicorn.conf.py does it), and /metrics aggregates all workers' files. Without it (tests,
the Flask dev server) the process's default registry is served.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

# Latency buckets from 1 ms: the gateway's single-image target is a few milliseconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "gateway_requests_total", "HTTP requests by route, method and status", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "gateway_request_seconds", "Whole request latency by route", ["route"], buckets=_LATENCY_BUCKETS
)
BACKEND_SECONDS = Histogram(
    "gateway_backend_seconds", "Latency of the model backend call", ["backend"], buckets=_LATENCY_BUCKETS
)
IMAGES_PER_REQUEST = Histogram(
    "gateway_images_per_request", "Images in each predict request", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
ERRORS = Counter("gateway_errors_total", "Error responses by stable error code", ["code"])


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
