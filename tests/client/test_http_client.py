"""HTTPClient against the real gateway under gunicorn, and its retry rules against a scripted server."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from client.grpc import GRPCClient
from client.http import HTTPClient
from client.results import ClientError
from tests.fixtures.gateway import free_port


@pytest.fixture(scope="module")
def gateway(gateway_server) -> Iterator[HTTPClient]:
    with HTTPClient(gateway_server, timeout=60) as client:
        yield client


@pytest.mark.slow
def test_predict_through_the_gateway_matches_tfserving(
    gateway, tfserving_double, exported_model, sample_images
):
    result = gateway.predict(sample_images, top_k=2)
    assert (result.model_name, result.model_version) == (exported_model.name, exported_model.version)
    assert [i.filename for i in result.images] == [p.name for p in sample_images]
    assert all(len(i.top_k) == 2 for i in result.images)
    assert list(result.images[0].probabilities) == list(exported_model.class_names)
    # Same model, same client-side preprocessing as the gateway's: the answers agree.
    with GRPCClient(tfserving_double.address, tfserving_double.model_name, timeout=30) as grpc_client:
        direct = grpc_client.predict(sample_images, top_k=2)
    labels = list(exported_model.class_names)
    via_gateway = np.array([[i.probabilities[c] for c in labels] for i in result.images])
    via_grpc = np.array([[i.probabilities[c] for c in labels] for i in direct.images])
    np.testing.assert_allclose(via_gateway, via_grpc, atol=1e-4)
    assert [i.top_k[0][0] for i in result.images] == [i.top_k[0][0] for i in direct.images]


@pytest.mark.slow
def test_models_ready_and_status(gateway, exported_model):
    assert gateway.ready() is True
    info = gateway.models()
    assert info["name"] == exported_model.name and info["class_names"] == list(exported_model.class_names)
    status = gateway.status()
    assert status.ready and [(v.version, v.state) for v in status.versions] == [
        (exported_model.version, "AVAILABLE")
    ]
    assert "trained on synthetic (SYNTHETIC demo data)" in status.versions[0].detail


@pytest.mark.slow
def test_status_lists_a_newer_version_that_failed_to_load(exported_model, tmp_path):
    from tests.fixtures.exported import copy_model_base
    from tests.fixtures.gateway import embedded_gateway, serve_in_thread

    base = copy_model_base(exported_model, tmp_path / "base")
    broken = base / exported_model.name / str(exported_model.version + 1)
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    with (
        embedded_gateway(base, exported_model.name) as app,
        serve_in_thread(app) as url,
        HTTPClient(url, timeout=30) as client,
    ):
        status = client.status()
    assert status.ready
    assert [(v.version, v.state) for v in status.versions] == [
        (exported_model.version + 1, "END"),
        (exported_model.version, "AVAILABLE"),
    ]
    assert status.versions[0].detail.startswith("failed to load: ")


@pytest.mark.slow
def test_gateway_errors_carry_its_code_and_message(gateway):
    with pytest.raises(ClientError) as info:
        gateway.predict([("notes.png", b"this is not an image")])
    assert info.value.status == 400
    assert info.value.code == "not_an_image"
    assert "notes.png" in info.value.message
    assert re.search(r"\(request_id [0-9a-f]{32}\)$", info.value.message)  # gunicorn's answer carries it
    with pytest.raises(ClientError) as info:
        gateway.predict([("empty.png", b"")], top_k=1)
    assert (info.value.status, info.value.code) == (400, "empty_file")


def test_a_request_id_of_the_callers_follows_the_request(gateway):
    """Sent as X-Request-ID, the gateway keeps it: its error body (so the message) names it."""
    with pytest.raises(ClientError) as info:
        gateway.predict([("notes.png", b"this is not an image")], request_id="ticket-9.retry_2")
    assert info.value.message.endswith("(request_id ticket-9.retry_2)")


@pytest.mark.parametrize("bad", ["two words", "x" * 65, "line\nbreak", "caf\u00e9"])
def test_a_request_id_the_gateway_would_replace_is_refused_before_sending(bad):
    """The gateway replaces an invalid X-Request-ID with its own, so the caller's id would be in no log:
    refused first, naming the rule. Nothing listens at the URL: a sent request would be a connection error."""
    with HTTPClient(f"http://127.0.0.1:{free_port()}", timeout=5) as client:
        with pytest.raises(ClientError) as info:
            client.predict([("a.png", b"not sent")], request_id=bad)
    assert info.value.code == "bad_request_id"
    assert "1..64 characters of A-Z a-z 0-9 . _ -" in info.value.message


def test_connection_refused_is_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with (
        HTTPClient(url, retries=2, backoff_factor=0.1, timeout=5) as client,
        pytest.raises(ClientError) as info,
    ):
        client.predict([("a.png", b"x")])
    assert info.value.code == "connection_error"
    assert url in info.value.message and "is the gateway running" in info.value.message


class _Scripted(BaseHTTPRequestHandler):
    """Answers 503 with Retry-After for the first `failures` requests, then a gateway-shaped 200."""

    failures = 0
    retry_after = "1"
    seen: list[float] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(time.monotonic())
        if len(self.seen) <= self.failures:
            body = {
                "error": {
                    "code": "backend_unavailable",
                    "message": "model loading; retry after a moment",
                    "request_id": "r-17",
                }
            }
            self._send(503, body, {"Retry-After": type(self).retry_after})
        else:
            probabilities = {"cat": 0.7, "dog": 0.3}
            body = {
                "model": {"name": "cifar10", "version": 3},
                "predictions": [
                    {
                        "filename": "a.png",
                        "top_k": [{"label": "cat", "probability": 0.7}],
                        "probabilities": probabilities,
                    }
                ],
            }
            self._send(200, body, {})

    def _send(self, status: int, body: dict, headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def scripted() -> Iterator[tuple[str, type[_Scripted]]]:
    handler = type("Handler", (_Scripted,), {"failures": 0, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_503_is_retried_honouring_retry_after(scripted):
    url, handler = scripted
    handler.failures = 2
    with HTTPClient(url, retries=3, backoff_factor=0.01) as client:
        result = client.predict([("a.png", b"bytes")], top_k=1)
    assert result.model_version == 3 and result.images[0].top_k == [("cat", 0.7)]
    assert len(handler.seen) == 3
    gaps = np.diff(handler.seen)
    assert (gaps >= 0.95).all(), f"retried before Retry-After elapsed: {gaps}"


def test_503_after_all_retries_raises_the_gateway_error(scripted):
    url, handler = scripted
    handler.failures = 100
    with HTTPClient(url, retries=1, backoff_factor=0.01) as client, pytest.raises(ClientError) as info:
        client.predict([("a.png", b"bytes")])
    assert len(handler.seen) == 2
    assert (info.value.status, info.value.code) == (503, "backend_unavailable")
    assert "retry after a moment" in info.value.message
    assert "(request_id r-17)" in info.value.message  # what the gateway's log is searched by


def test_by_default_a_503_is_retried_once(scripted):
    url, handler = scripted
    handler.failures, handler.retry_after = 100, "0"
    with HTTPClient(url) as client, pytest.raises(ClientError):
        client.predict([("a.png", b"bytes")])
    assert len(handler.seen) == 2  # was 4 (3 retries), and up to 5 attempts each at the gateway


def test_retry_after_over_the_cap_is_not_retried_early(scripted):
    url, handler = scripted
    handler.failures, handler.retry_after = 100, "30"
    started = time.monotonic()
    with HTTPClient(url, retries=3, max_retry_after_s=10) as client, pytest.raises(ClientError) as info:
        client.predict([("a.png", b"bytes")])
    assert len(handler.seen) == 1 and time.monotonic() - started < 5
    assert info.value.status == 503


def test_retries_stay_within_the_retry_budget(scripted):
    url, handler = scripted
    handler.failures, handler.retry_after = 1000, "0"
    with HTTPClient(url, retries=3, breaker_failures=1000) as client:
        for _ in range(10):
            with pytest.raises(ClientError):
                client.predict([("a.png", b"bytes")])
    # 10 calls x 4 attempts would be 40; the budget allows a reserve of 3 plus 20 % of the calls.
    assert 10 <= len(handler.seen) <= 10 + 3 + 2


def test_circuit_breaker_fails_fast_then_probes(scripted):
    url, handler = scripted
    handler.failures, handler.retry_after = 3, "0"
    with HTTPClient(url, retries=0, breaker_failures=3, breaker_open_s=0.5) as client:
        for _ in range(3):
            with pytest.raises(ClientError):
                client.predict([("a.png", b"bytes")])
        with pytest.raises(ClientError) as info:
            client.predict([("a.png", b"bytes")])
        assert info.value.code == "circuit_open" and len(handler.seen) == 3  # nothing sent
        time.sleep(0.6)
        assert client.predict([("a.png", b"bytes")], top_k=1).model_version == 3  # the probe
        assert client.predict([("a.png", b"bytes")], top_k=1).model_version == 3  # closed again
