"""Error bodies without internals (issue 13, item 4): every error carries the request id (also in the
X-Request-ID header and the gateway's log line), never addresses, peers, paths, gRPC details or
exception text; those go to the log under the same id.

The gateway here points at a TF Serving address nothing listens on: a real gRPC channel failing to
connect, the same failure as TF Serving being down, without loading any model.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest
from flask import Flask
from PIL import Image

from serving.app import create_app
from serving.config import Settings
from tests.fixtures.gateway import free_port

UUID_HEX = re.compile(r"[0-9a-f]{32}")
# What must never reach a client: the address, any IP or port, gRPC's own words, file paths.
LEAKS = re.compile(
    r"127\.0\.0\.1|ipv4|:\d{2,5}\b|grpc|connect to|refused|/tmp|/work|Traceback|StatusCode", re.I
)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 90)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def down_app() -> Iterator[tuple[Flask, str]]:
    """The gateway with TF Serving at an address where nothing listens (TF Serving down)."""
    address = f"127.0.0.1:{free_port()}"
    app = create_app(Settings(tfserving_address=address, model_name="cifar10", deadline_s=1.0))

    @app.get("/test-only/boom")
    def boom() -> None:  # an unexpected failure whose text names internals
        raise RuntimeError("cannot open /work/secret/model.pb for 10.1.2.3:8500")

    yield app, address
    app.extensions["gateway.backend"].close()


def test_tfserving_down_is_503_without_internals_and_with_the_request_id(down_app, caplog) -> None:
    app, address = down_app
    caplog.set_level(logging.INFO, logger="serving")
    response = app.test_client().post("/v1/predict", data=png(), content_type="image/png")
    assert response.status_code == 503 and "Retry-After" in response.headers
    error = response.get_json()["error"]
    assert error["code"] == "backend_unavailable"
    assert not LEAKS.search(response.get_data(as_text=True)), response.get_data(as_text=True)
    request_id = response.headers["X-Request-ID"]
    assert UUID_HEX.fullmatch(request_id) and error["request_id"] == request_id
    # The details the body leaves out are in the log, under the same id.
    logged = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert any(address in line and "UNAVAILABLE" in line for line in logged), logged
    assert any("-> 503 backend_unavailable" in line for line in logged), logged


def test_readiness_with_tfserving_down_names_no_address(down_app) -> None:
    app, address = down_app
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert not LEAKS.search(response.get_data(as_text=True)), response.get_data(as_text=True)


def test_unexpected_exception_is_500_without_its_text(down_app, caplog) -> None:
    app, _ = down_app
    caplog.set_level(logging.INFO, logger="serving")
    response = app.test_client().get("/test-only/boom", headers={"X-Request-ID": "trace-42"})
    assert response.status_code == 500
    body = response.get_json()
    assert body["error"]["code"] == "internal_error" and body["error"]["request_id"] == "trace-42"
    text = response.get_data(as_text=True)
    assert "secret" not in text and "10.1.2.3" not in text and "RuntimeError" not in text
    assert response.headers["X-Request-ID"] == "trace-42"
    traced = [r for r in caplog.records if "trace-42" in r.getMessage() and r.exc_info]
    assert traced and "/work/secret/model.pb" in str(traced[0].exc_info[1])


@pytest.mark.parametrize("incoming", ["abc-123.X_y", "a", "7" * 64])
def test_a_valid_incoming_request_id_is_echoed(down_app, incoming: str) -> None:
    app, _ = down_app
    client = app.test_client()
    assert client.get("/healthz", headers={"X-Request-ID": incoming}).headers["X-Request-ID"] == incoming
    missing = client.get("/no-such-page", headers={"X-Request-ID": incoming})
    assert missing.status_code == 404 and missing.get_json()["error"]["request_id"] == incoming


@pytest.mark.parametrize("incoming", ["", "x" * 65, "has space", "semi;colon", "new\\nline", "é"])
def test_an_invalid_incoming_request_id_is_replaced(down_app, incoming: str) -> None:
    app, _ = down_app
    response = app.test_client().get("/no-such-page", headers={"X-Request-ID": incoming})
    request_id = response.headers["X-Request-ID"]
    assert UUID_HEX.fullmatch(request_id) and request_id != incoming
    assert response.get_json()["error"]["request_id"] == request_id


def test_every_request_gets_its_own_id(down_app) -> None:
    app, _ = down_app
    client = app.test_client()
    ids = {client.get("/healthz").headers["X-Request-ID"] for _ in range(5)}
    assert len(ids) == 5 and all(UUID_HEX.fullmatch(i) for i in ids)


@pytest.mark.slow
def test_embedded_load_failure_503_names_no_path(tmp_path, caplog) -> None:
    """A model directory whose only version is corrupt: the 503 says the model is not loaded, and
    where it lives on disk and why it failed stay in the log."""
    from tests.fixtures.gateway import embedded_gateway

    broken = tmp_path / "models" / "cifar10" / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    caplog.set_level(logging.INFO, logger="serving")
    with embedded_gateway(tmp_path / "models", "cifar10") as app:
        response = app.test_client().post("/v1/predict", data=png(), content_type="image/png")
    assert response.status_code == 503
    text = response.get_data(as_text=True)
    assert str(tmp_path) not in text and "details in the gateway log" in text, text
    request_id = response.headers["X-Request-ID"]
    assert any(request_id in r.getMessage() for r in caplog.records)  # the answer's own log line
    # The load failure itself, with where the broken version lives, is in the log.
    assert any(str(tmp_path) in r.getMessage() or str(tmp_path) in str(r.exc_info) for r in caplog.records)
