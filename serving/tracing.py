"""Optional OpenTelemetry tracing of the gateway and its gRPC calls to TensorFlow Serving.

Off by default. GATEWAY_OTEL=1, or the standard OTEL_EXPORTER_OTLP_ENDPOINT (or _TRACES_ENDPOINT) or
OTEL_SERVICE_NAME, turn it on (serving/config.py reads them into `Settings.tracing_exporter`); then
  * every HTTP request gets a SERVER span (opentelemetry-instrumentation-flask), continuing the
    caller's trace when it sends a W3C `traceparent` header (a proxy or client that traces);
  * every gRPC call to TF Serving gets a CLIENT span, a child of the request's span
    (opentelemetry-instrumentation-grpc's client interceptor on the backend's channel), and the trace
    context travels in the call's metadata (`traceparent`), so tools on TF Serving's side (a service
    mesh proxy, a collector) can join the two;
  * every span started while a request is handled carries its request id (serving/request_id.py) as
    the `gateway.request_id` attribute, so the id a client reports finds its trace.
Spans go to the OTLP exporter (OTEL_EXPORTER_OTLP_PROTOCOL http/protobuf, the default, or grpc), or
to stdout with OTEL_TRACES_EXPORTER=console; the SDK reads the other OTEL_* variables itself
(endpoint, headers, sampler, batch delays, resource attributes).

The request id goes to TF Serving in the metadata whether or not tracing is on
(serving/backends/tfserving.py); this module adds the spans.

The packages are the `tracing` extra (`pip install 'cifar10-service[tracing]'`), not base
dependencies: nothing here imports them unless tracing is on, and asking for tracing without them
fails the worker's start with a message naming the extra.

One tracer provider per process, made by the first app built with tracing on. Under gunicorn each
worker builds its app after the fork (the app is not preloaded, serving/gunicorn.conf.py), so each
worker has its own provider and export thread; the provider is not made the global one, because the
gateway passes it to both instrumentations explicitly.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import grpc
from flask import Flask

from serving import request_id
from serving.config import ConfigError, Settings

if TYPE_CHECKING:  # the packages are optional; only type checkers see these
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

REQUEST_ID_ATTRIBUTE = "gateway.request_id"
DEFAULT_SERVICE_NAME = "cifar10-gateway"  # unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one
INSTALL_HINT = "pip install 'cifar10-service[tracing]'"

_lock = threading.Lock()
_provider: TracerProvider | None = None  # this process's provider while tracing is on


def start(settings: Settings, *, span_exporter: SpanExporter | None = None) -> TracerProvider:
    """This process's tracer provider, made on the first call: spans go to `span_exporter` when given
    (tests: an InMemorySpanExporter, exported as each span ends), else to the exporter the settings
    name. Later calls return the same provider."""
    global _provider
    with _lock:
        if _provider is None:
            _provider = _new_provider(settings.tracing_exporter, span_exporter)
        return _provider


def install(app: Flask, settings: Settings) -> None:
    """Trace app's requests when the settings turn tracing on; otherwise nothing, not even an import.
    Call it right after request_id.install(app): its before_request then runs after the id is chosen
    and before auth, rate limits or deadlines can refuse the request, so refused requests are traced
    too."""
    if settings.tracing_exporter is None:
        return
    provider = start(settings)
    flask_instrumentation = _require("opentelemetry.instrumentation.flask")
    # No SQL commenter: the gateway has no database, and the commenter attaches a context per request
    # that it never detaches.
    flask_instrumentation.FlaskInstrumentor.instrument_app(
        app, tracer_provider=provider, enable_commenter=False
    )


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """`channel` with a CLIENT span per call and the trace context in each call's metadata while this
    process traces; `channel` itself otherwise (the backend calls this when it opens its channel)."""
    provider = _provider
    if provider is None:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    return intercept_channel(channel, client_interceptor(tracer_provider=provider))


def shutdown() -> None:
    """Export what is pending and stop tracing in this process (the SDK also does this at exit)."""
    global _provider
    with _lock:
        provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def _require(module: str) -> Any:
    """Import an OpenTelemetry module, or fail naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"tracing is on (GATEWAY_OTEL=1, or OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_SERVICE_NAME is set) but "
            f"{error.name or module} is not installed: install the tracing extra ({INSTALL_HINT}), or "
            "unset those variables (or set GATEWAY_OTEL=0) to serve without tracing"
        ) from None


def _new_provider(exporter_name: str | None, span_exporter: SpanExporter | None) -> TracerProvider:
    sdk_trace = _require("opentelemetry.sdk.trace")
    sdk_export = _require("opentelemetry.sdk.trace.export")
    resources = _require("opentelemetry.sdk.resources")

    class RequestIdProcessor(sdk_trace.SpanProcessor):
        """Puts the request id on every span started while the request is handled (its thread)."""

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            current = request_id.current()
            if current is not None:
                span.set_attribute(REQUEST_ID_ATTRIBUTE, current)

    # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the pid tells a
    # gunicorn worker's spans from another's.
    resource = resources.Resource.create({"process.pid": os.getpid()})
    if str(resource.attributes.get(resources.SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(resources.Resource({resources.SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = sdk_trace.TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER
    provider.add_span_processor(RequestIdProcessor())
    if span_exporter is not None:
        provider.add_span_processor(sdk_export.SimpleSpanProcessor(span_exporter))
        return provider
    if exporter_name == "otlp-http":
        otlp = _require("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        exporter = otlp.OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*
    elif exporter_name == "otlp-grpc":
        otlp = _require("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
        exporter = otlp.OTLPSpanExporter()
    elif exporter_name == "console":
        exporter = sdk_export.ConsoleSpanExporter()
    else:  # "none": spans are made (the trace context still reaches TF Serving) but not exported
        return provider
    # Batches leave on the processor's own thread, never on a request's.
    provider.add_span_processor(sdk_export.BatchSpanProcessor(exporter))
    return provider
