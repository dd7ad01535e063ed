"""The gateway as deployed: gunicorn, two worker processes, real HTTP."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest
import requests
from PIL import Image

from tests.fixtures.metrics import sample_values

pytestmark = pytest.mark.slow  # starts gunicorn with two TensorFlow workers


def predict_count(base_url: str) -> float:
    text = requests.get(f"{base_url}/metrics", timeout=10).text
    labels = {"route": "/v1/predict", "method": "POST", "status": "200"}  # all its labels
    return next(iter(sample_values(text, "gateway_requests_total", **labels)), 0.0)


def test_upload_real_photos_end_to_end(gateway_server: str, exported_model, cifar_sample) -> None:
    sample = cifar_sample[:8]
    files = [("images", (path.name, path.read_bytes(), "image/png")) for path, _ in sample]
    response = requests.post(f"{gateway_server}/v1/predict", files=files, params={"top_k": 3}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": exported_model.name, "version": exported_model.version}
    assert [p["filename"] for p in body["predictions"]] == [path.name for path, _ in sample]
    assert all(len(p["probabilities"]) == len(exported_model.class_names) for p in body["predictions"])


def test_metrics_aggregate_all_workers(gateway_server: str) -> None:
    before = predict_count(gateway_server)
    png = _png()
    sent = 12
    for _ in range(sent):
        # A new connection each time, so both workers take requests.
        with requests.Session() as session:
            r = session.post(f"{gateway_server}/v1/predict", data=png, headers={"Content-Type": "image/png"})
            assert r.status_code == 200
    # Whichever worker answers /metrics, it reports every worker's requests.
    for _ in range(6):
        with requests.Session() as session:
            assert predict_count(gateway_server) - before == sent
    text = requests.get(f"{gateway_server}/metrics", timeout=10).text
    assert "gateway_request_seconds_bucket" in text and "gateway_backend_seconds_bucket" in text


def test_oversized_upload_is_refused_before_the_body_is_sent(gateway_server: str) -> None:
    url = urlparse(gateway_server)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000000000\r\n\r\n" + b"\x89PNG" + b"\0" * 1000
        )
        start = time.perf_counter()
        reply = ""
        # Headers and body may come in separate packets; read until the body is in or the server closes.
        while '"upload_too_large"' not in reply and time.perf_counter() - start < 5:
            data = sock.recv(65536)
            if not data:
                break
            reply += data.decode("latin-1")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert '"upload_too_large"' in reply
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("content_type", ["image/png", "multipart/form-data; boundary=xx"])
def test_chunked_upload_over_the_limit_is_cut_off(gateway_server: str, content_type: str) -> None:
    """No Content-Length to check: the gateway stops reading at the limit (20 MiB by default)."""
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        if content_type.startswith("multipart"):
            yield b'--xx\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
        chunk = b"\0" * (1024 * 1024)
        for _ in range(200):  # 200 MiB offered
            sent += len(chunk)
            yield chunk

    try:
        response = requests.post(
            f"{gateway_server}/v1/predict", data=body(), headers={"Content-Type": content_type}, timeout=30
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "upload_too_large"
    except requests.ConnectionError:
        pass  # the server may close the connection while the client is still sending; also a refusal
    assert sent < 100 * 1024 * 1024  # refused long before the whole body went through


def test_chunked_upload_within_the_limit_is_read_whole(gateway_server: str) -> None:
    data = _png()

    def body() -> Iterator[bytes]:
        yield data[:100]
        yield data[100:]

    response = requests.post(
        f"{gateway_server}/v1/predict", data=body(), headers={"Content-Type": "image/png"}, timeout=30
    )
    assert response.status_code == 200, response.text


def test_health_endpoints(gateway_server: str) -> None:
    assert requests.get(f"{gateway_server}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{gateway_server}/readyz", timeout=5).json()["ready"] is True


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 50, 200)).save(buffer, "PNG")
    return buffer.getvalue()
