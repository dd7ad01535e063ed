"""Tracing (issue 17, item 5): the request id reaches TF Serving in every gRPC call's metadata, and with
OpenTelemetry on (serving/tracing.py) a request makes a SERVER span with a CLIENT span per gRPC call
as its child, the trace context in the call's metadata, the request id on both.

All against the TF Serving double over real gRPC (it records the metadata it receives, as a tool on
TF Serving's side would see it), through the real Flask and gRPC instrumentations; the last test
runs the gateway under real gunicorn exporting OTLP/HTTP to a receiver here.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from flask import Flask
from PIL import Image

from serving import tracing
from serving.app import create_app
from serving.config import ConfigError, Settings
from tests.fixtures.gateway import running_gateway
from tests.tfserving_double.recording import ReceivedCall

PREDICT = "/tensorflow.serving.PredictionService/Predict"
MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
# A caller's trace (W3C Trace Context's own example): the gateway's span must continue it.
CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 36), (30, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def predict(client, request_id: str, **headers: str):
    return client.post(
        "/v1/predict",
        data={"images": [(io.BytesIO(png()), "a.png")]},
        headers={"X-Request-ID": request_id, **headers},
    )


def received_for(double, request_id: str) -> list[ReceivedCall]:
    """The calls the double received that carry this request id, oldest first."""
    return [call for call in double.server.received if call.metadata.get("x-request-id") == request_id]


def traceparent(span) -> str:
    """The W3C traceparent header a span's context propagates (version 00)."""
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def tfserving_settings(double, **overrides: object) -> Settings:
    # A generous deadline: the double's first Predict of a session builds the model's function.
    return Settings(
        tfserving_address=double.address, model_name=double.model_name, deadline_s=60, **overrides
    )


# --- the request id in gRPC metadata (tracing off) ---------------------------------------------------


@pytest.mark.slow
def test_request_id_reaches_tfserving_on_every_call_and_retry(tfserving_controls) -> None:
    app = create_app(tfserving_settings(tfserving_controls))
    client = app.test_client()
    try:
        response = predict(client, "rid-predict-1")
        assert response.status_code == 200, response.get_json()
        [call] = received_for(tfserving_controls, "rid-predict-1")
        assert call.method == PREDICT
        assert "traceparent" not in call.metadata  # tracing is off: the id alone

        assert client.get("/readyz", headers={"X-Request-ID": "rid-ready-1"}).status_code == 200
        assert MODEL_STATUS in [call.method for call in received_for(tfserving_controls, "rid-ready-1")]

        # A lost connection is retried: the retry carries the same id, so both attempts join up.
        tfserving_controls.fail_next(1)
        response = predict(client, "rid-retry-1")
        assert response.status_code == 200, response.get_json()
        assert [call.method for call in received_for(tfserving_controls, "rid-retry-1")] == [PREDICT, PREDICT]

        # An id the gateway chose itself (none, or an invalid one, came in) travels the same way.
        response = client.post("/v1/predict", data={"images": [(io.BytesIO(png()), "a.png")]})
        chosen = response.headers["X-Request-ID"]
        assert [call.method for call in received_for(tfserving_controls, chosen)] == [PREDICT]

        # Outside a request (start-up, a background thread) there is no id to send.
        before = len(tfserving_controls.server.received)
        assert app.extensions["gateway.backend"].status().ready
        outside = tfserving_controls.server.received[before:]
        assert outside and all("x-request-id" not in call.metadata for call in outside)
    finally:
        app.extensions["gateway.backend"].close()


# --- OpenTelemetry on, spans to an in-memory exporter ------------------------------------------------


@pytest.fixture
def traced(tfserving_controls) -> Iterator[tuple[Flask, object]]:
    """A gateway on the double with tracing on; its spans land in the InMemorySpanExporter."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    tracing.shutdown()  # no provider left over from another test in this process
    settings = tfserving_settings(tfserving_controls, tracing_exporter="none")
    exporter = InMemorySpanExporter()
    tracing.start(settings, span_exporter=exporter)
    app = create_app(settings)
    try:
        yield app, exporter
    finally:
        app.extensions["gateway.backend"].close()
        tracing.shutdown()


def spans_by_kind(exporter) -> tuple[list, list]:
    from opentelemetry.trace import SpanKind

    spans = exporter.get_finished_spans()
    return [s for s in spans if s.kind == SpanKind.SERVER], [s for s in spans if s.kind == SpanKind.CLIENT]


@pytest.mark.slow
def test_a_request_makes_a_server_span_with_a_grpc_client_child(traced, tfserving_controls) -> None:
    app, exporter = traced
    response = predict(app.test_client(), "rid-traced-1")
    assert response.status_code == 200, response.get_json()

    [server], [client] = spans_by_kind(exporter)
    assert server.name == "POST /v1/predict"
    assert server.attributes[tracing.REQUEST_ID_ATTRIBUTE] == "rid-traced-1"
    assert client.name == PREDICT
    assert client.attributes[tracing.REQUEST_ID_ATTRIBUTE] == "rid-traced-1"
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    assert server.resource.attributes["service.name"] == tracing.DEFAULT_SERVICE_NAME

    # TF Serving's side received the request id and the trace context of the client span.
    [call] = received_for(tfserving_controls, "rid-traced-1")
    assert call.metadata["traceparent"] == traceparent(client)


@pytest.mark.slow
def test_the_gateway_continues_the_callers_trace_and_traces_retries(traced, tfserving_controls) -> None:
    app, exporter = traced
    tfserving_controls.fail_next(1)  # the first attempt finds the server "shutting down"
    response = predict(
        app.test_client(), "rid-traced-2", traceparent=f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"
    )
    assert response.status_code == 200, response.get_json()

    [server], clients = spans_by_kind(exporter)
    assert server.context.trace_id == int(CALLER_TRACE_ID, 16)
    assert server.parent is not None and server.parent.span_id == int(CALLER_SPAN_ID, 16)
    # One client span per attempt, both children of the request's span: the failed one says why.
    assert [span.name for span in clients] == [PREDICT, PREDICT]
    assert all(span.parent.span_id == server.context.span_id for span in clients)
    failed, succeeded = clients
    assert not failed.status.is_ok and failed.attributes["rpc.grpc.status_code"] == 14  # UNAVAILABLE
    assert succeeded.status.is_unset or succeeded.status.is_ok
    calls = received_for(tfserving_controls, "rid-traced-2")
    assert [call.metadata["traceparent"] for call in calls] == [traceparent(span) for span in clients]


@pytest.mark.slow
def test_readiness_checks_are_traced_with_their_request_id(traced, tfserving_controls) -> None:
    app, exporter = traced
    assert app.test_client().get("/readyz", headers={"X-Request-ID": "rid-traced-3"}).status_code == 200
    [server], clients = spans_by_kind(exporter)
    assert server.name == "GET /readyz"
    assert MODEL_STATUS in [span.name for span in clients]
    for span in clients:
        assert span.parent.span_id == server.context.span_id
        assert span.attributes[tracing.REQUEST_ID_ATTRIBUTE] == "rid-traced-3"


# --- tracing off, and on without the packages ---------------------------------------------------------

OFF_SCRIPT = textwrap.dedent(
    """
    import io, sys
    # The packages are absent: every `import opentelemetry...` fails, as in an image without the extra.
    sys.modules["opentelemetry"] = None
    from PIL import Image
    from serving.app import create_app
    from serving.config import ConfigError, Settings

    settings = Settings.from_env()
    assert settings.tracing_exporter is None, settings.tracing_exporter
    app = create_app(settings)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 36), (30, 120, 200)).save(buffer, "PNG")
    upload = {"images": [(io.BytesIO(buffer.getvalue()), "a.png")]}
    response = app.test_client().post("/v1/predict", data=upload)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    app.extensions["gateway.backend"].close()

    try:
        create_app(Settings.from_env({**__import__("os").environ, "GATEWAY_OTEL": "1"}))
    except ConfigError as error:
        print("refused:", error)
    else:
        raise AssertionError("GATEWAY_OTEL=1 without the packages must fail the start")
    """
)


@pytest.mark.slow
def test_tracing_off_needs_no_opentelemetry_and_on_without_it_fails_naming_the_extra(
    tfserving_double, project_root
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GATEWAY_"))}
    env.update(
        GATEWAY_TFSERVING_ADDRESS=tfserving_double.address,
        GATEWAY_MODEL_NAME=tfserving_double.model_name,
        GATEWAY_DEADLINE_S="60",
    )
    result = subprocess.run(
        [sys.executable, "-c", OFF_SCRIPT],
        cwd=project_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: tracing is on" in result.stdout
    assert "pip install 'cifar10-service[tracing]'" in result.stdout


# --- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"GATEWAY_OTEL": "1"}, "otlp-http"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp-http"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp-http"),
        ({"OTEL_SERVICE_NAME": "gateway", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "otlp-grpc"),
        (
            {"GATEWAY_OTEL": "1", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
             "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
            "otlp-http",
        ),  # fmt: skip
        ({"GATEWAY_OTEL": "true", "OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"GATEWAY_OTEL": "1", "OTEL_TRACES_EXPORTER": "none"}, "none"),
        ({"GATEWAY_OTEL": "0", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None),
        ({"GATEWAY_OTEL": "1", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod"}, None),  # not a switch
    ],
)
def test_tracing_is_off_unless_asked_for(env: dict[str, str], expected: str | None) -> None:
    assert Settings.from_env(env).tracing_exporter == expected


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GATEWAY_OTEL": "maybe"}, "GATEWAY_OTEL='maybe'"),
        ({"GATEWAY_OTEL": "1", "OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin'"),
        ({"GATEWAY_OTEL": "1", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL="),
    ],
)
def test_bad_tracing_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("/", ".")):
        Settings.from_env(env)


# --- real gunicorn, OTLP over HTTP ---------------------------------------------------------------------


class OTLPReceiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (POST /v1/traces, protobuf), keeping what arrives as
    (resource attributes, span) pairs."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[tuple[dict, object]] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                with lock:
                    for resource_spans in request.resource_spans:
                        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans += [(resource, span) for span in scope_spans.spans]
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _value(any_value) -> object:
    return getattr(any_value, any_value.WhichOneof("value"))


def _attribute(span, key: str) -> object:
    return next((_value(a.value) for a in span.attributes if a.key == key), None)


@pytest.mark.slow
def test_gunicorn_workers_export_spans_over_otlp(tfserving_double, tmp_path) -> None:
    from opentelemetry.proto.trace.v1 import trace_pb2

    receiver = OTLPReceiver()
    env = {
        "GATEWAY_TFSERVING_ADDRESS": tfserving_double.address,
        "GATEWAY_MODEL_NAME": tfserving_double.model_name,
        # The standard variables alone turn tracing on (no GATEWAY_OTEL), as an operator sets them.
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds between the worker's exports
    }
    try:
        with running_gateway(env, workers=2, log_dir=tmp_path) as gateway:
            response = requests.post(
                gateway.url + "/v1/predict",
                files={"images": ("a.png", png(), "image/png")},
                headers={"X-Request-ID": "rid-gunicorn-1"},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            workers = {worker.pid for worker in gateway.workers()}

            def ours() -> list[tuple[dict, object]]:
                return [
                    (resource, span)
                    for resource, span in list(receiver.spans)
                    if _attribute(span, tracing.REQUEST_ID_ATTRIBUTE) == "rid-gunicorn-1"
                ]

            from loadtest.gateway_process import wait_until

            wait_until(lambda: len(ours()) >= 2, 30, "the worker exporting the request's two spans")
            by_kind = {span.kind: (resource, span) for resource, span in ours()}
            (resource, server) = by_kind[trace_pb2.Span.SPAN_KIND_SERVER]
            (_, client) = by_kind[trace_pb2.Span.SPAN_KIND_CLIENT]
            assert resource["service.name"] == "gateway-under-test"
            # Exported by a worker, with a provider made after the fork (not by the master).
            assert resource["process.pid"] in workers and resource["process.pid"] != gateway.process.pid
            assert client.name == PREDICT and client.parent_span_id == server.span_id
            assert client.trace_id == server.trace_id
            [call] = received_for(tfserving_double, "rid-gunicorn-1")
            sent = f"00-{client.trace_id.hex()}-{client.span_id.hex()}-"
            assert call.metadata["traceparent"].startswith(sent)
    finally:
        receiver.close()
