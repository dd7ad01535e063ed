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
    Gauge,
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

# Cross-request batching in the embedded backend (serving/batching.py).
BATCH_SIZE = Histogram(
    "gateway_batch_size", "Images in each model call (before padding)", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)
BATCH_QUEUE_SECONDS = Histogram(
    "gateway_batch_queue_seconds", "Time a request waited in the batching queue", buckets=_LATENCY_BUCKETS
)
BATCH_REJECTED = Counter(
    "gateway_batch_rejected_total", "Requests refused because the batching queue was full"
)

# Overload control towards TF Serving (serving/backends/tfserving.py, contract/overload.py).
# The breaker is per worker; "max" over live workers shows whether any worker's breaker is open.
BREAKER_STATE = Gauge(
    "gateway_breaker_state",
    "Circuit breaker to the model backend: 0 closed, 1 half-open, 2 open (max over workers)",
    ["backend"],
    multiprocess_mode="livemax",
)
BREAKER_TRANSITIONS = Counter(
    "gateway_breaker_transitions_total",
    "Circuit breaker state changes, by the state entered",
    ["backend", "state"],
)
# decision: retried | budget_exhausted (a retryable failure not retried: over the retry budget or out
# of time) | load_shed (the backend shed load: never retried) | breaker_open (failed fast, no call).
BACKEND_RETRIES = Counter(
    "gateway_backend_retry_decisions_total",
    "What the gateway did after a failed backend attempt",
    ["backend", "decision"],
)

# API keys and rate limits (serving/auth.py, serving/ratelimit.py). Labelled by the key's name from
# the keys file, never by the key or the client address: the label set stays as small as the file.
API_KEY_REQUESTS = Counter(
    "gateway_api_key_requests_total", "/v1 requests by API key name and status", ["key_name", "status"]
)
AUTH_FAILURES = Counter(
    "gateway_auth_failures_total", "/v1 requests refused with 401, by reason (missing, invalid)", ["reason"]
)
RATE_LIMITED = Counter(
    "gateway_rate_limited_total",
    "Requests refused with 429, by API key name ('-': limited per client address)",
    ["key_name"],
)
# 1 while a worker limits in memory because the shared store (GATEWAY_RATE_LIMIT_STORAGE) does not
# answer: limits are then per worker, not shared. Set after each request; "max" over workers.
RATE_LIMIT_STORE_FALLBACK = Gauge(
    "gateway_rate_limit_store_fallback",
    "1 while the rate limits fall back to per-worker memory because their shared store is unreachable",
    multiprocess_mode="livemax",
)
API_KEY_RELOADS = Counter(
    "gateway_api_key_reloads_total", "Reloads of the API keys file, by result (ok, error)", ["result"]
)

# Stable and canary versions (serving/canary.py). `version` is a model version number (a handful
# are live at once), `role` one of stable | canary | shadow: what the version did for the request.
VERSION_REQUESTS = Counter(
    "gateway_version_requests_total", "Prediction calls by model version and role", ["version", "role"]
)
VERSION_ERRORS = Counter(
    "gateway_version_errors_total", "Failed prediction calls by model version and role", ["version", "role"]
)
VERSION_SECONDS = Histogram(
    "gateway_version_seconds",
    "Model call latency by model version and role",
    ["version", "role"],
    buckets=_LATENCY_BUCKETS,
)
# Top-1 agreement with stable = agreed / compared, per canary or shadow version.
VERSION_COMPARED = Counter(
    "gateway_version_compared_total",
    "Images whose top-1 class was compared with the stable version's",
    ["version", "role"],
)
VERSION_AGREED = Counter(
    "gateway_version_agreed_total",
    "Images whose top-1 class matched the stable version's",
    ["version", "role"],
)
SHADOW_DROPPED = Counter(
    "gateway_shadow_dropped_total", "Background comparisons (shadow or canary) dropped under load"
)

# Prediction sampling (serving/sampling.py). Losses never fail a request; reason: queue_full (the
# writer fell behind), write_failed (disk full, unwritable GATEWAY_SAMPLE_DIR), bad_prediction,
# record_failed. Counted in images.
SAMPLE_RECORDS = Counter("gateway_sample_records_total", "Images written to the prediction sample")
SAMPLE_ERRORS = Counter(
    "gateway_sample_errors_total", "Sampled images that were not stored, by reason", ["reason"]
)

# Drift (serving/drift_metrics.py): what the served versions answer, every predicted image counted.
# Class share = a class's rate / all classes' rate; abstain rate = abstained / all predicted, per
# `version` (the model version number; a handful are live at once).
PREDICTED_CLASS = Counter(
    "gateway_predicted_class_total",
    "Predicted images by top class and model version",
    ["version", "class_name"],
)
CONFIDENCE = Histogram(
    "gateway_prediction_confidence",
    "Top-class probability of each predicted image, by model version",
    ["version"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)
# ood_score: higher = less like the training classes (trainer/export/ood.py). The buckets cover each
# score the export may choose: energy (negative), 1 - max softmax (0..1) and the squared Mahalanobis
# distance (positive, growing with the feature width). Only versions exported with it count.
OOD_SCORE = Histogram(
    "gateway_ood_score",
    "Out-of-distribution score of each predicted image, by model version",
    ["version"],
    buckets=(-50, -25, -15, -10, -5, -2, 0, 0.1, 0.25, 0.5, 0.75, 1, 2, 5, 10, 25, 50, 100, 250, 500,
             1000, 2500, 5000),
)
ABSTAINED = Counter(
    "gateway_abstained_total",
    "Predicted images answered with abstain (not sure), by model version",
    ["version"],
)
VERSION_LABEL_UNKNOWN = Counter(
    "gateway_version_label_unknown_total",
    "Requests TF Serving refused for an unknown version label, answered by stable (or its latest) instead",
    ["label"],
)
