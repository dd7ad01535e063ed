"""The HTTP API through Flask's test client, on the real exported model (embedded backend)."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from flask import Flask
from PIL import Image
from werkzeug.test import EnvironBuilder, run_wsgi_app

from serving.app import create_app
from serving.backends.base import Explanation, ModelStatus, Prediction
from serving.config import Settings
from tests.fixtures.gateway import free_port
from tests.fixtures.metrics import sample_values

# The app under test serves the session's exported model, whose fixture trains and exports it.
pytestmark = pytest.mark.slow


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def noise_png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def files(*items: tuple[bytes, str]) -> dict:
    return {"images": [(io.BytesIO(data), name) for data, name in items]}


def assert_error(response, status: int, code: str) -> dict:  # response: a Flask TestResponse
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"]["code"] == code
    assert len(body["error"]["message"]) > 20  # a sentence with the fix, not just a code
    assert "Traceback" not in response.get_data(as_text=True)
    return body


@pytest.fixture(scope="module")
def strict_app(gateway_app: Flask) -> Flask:
    """Small limits, sharing the already-loaded model."""
    settings = Settings(max_images=2, max_upload_bytes=64 * 1024, max_pixels=250_000)
    return create_app(settings, backend=gateway_app.extensions["gateway.backend"])


# -- successful answers -------------------------------------------------------------------------


def test_predict_answers_every_image_in_order(gateway_client, exported_model) -> None:
    response = gateway_client.post(
        "/v1/predict?top_k=3", data=files((noise_png(1), "a.png"), (noise_png(2), "b.png"), (png(), "c.png"))
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["model"] == {"name": exported_model.name, "version": exported_model.version}
    assert [p["filename"] for p in body["predictions"]] == ["a.png", "b.png", "c.png"]
    for prediction in body["predictions"]:
        probabilities = prediction["probabilities"]
        assert list(probabilities) == list(exported_model.class_names)  # class order kept
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        top = prediction["top_k"]
        assert len(top) == 3
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
        assert top[0]["label"] == max(probabilities, key=probabilities.get)
    # Different pixels, different answers: the images were not mixed up or dropped.
    rows = [tuple(p["probabilities"].values()) for p in body["predictions"]]
    assert len(set(rows)) == 3


def test_raw_image_body_and_form_top_k(gateway_client) -> None:
    raw = gateway_client.post(
        "/v1/predict", data=png(), content_type="image/png", headers={"X-Filename": "red.png"}
    )
    assert raw.status_code == 200
    (prediction,) = raw.get_json()["predictions"]
    assert prediction["filename"] == "red.png" and len(prediction["top_k"]) == 5  # default top_k
    form = gateway_client.post("/v1/predict", data={**files((png(), "red.png")), "top_k": "2"})
    assert form.status_code == 200
    assert form.get_json()["predictions"][0]["probabilities"] == prediction["probabilities"]
    assert len(form.get_json()["predictions"][0]["top_k"]) == 2


def test_models_describes_the_served_model(gateway_client, exported_model) -> None:
    body = gateway_client.get("/v1/models").get_json()
    assert body["name"] == exported_model.name and body["version"] == exported_model.version
    assert body["class_names"] == list(exported_model.class_names)
    assert body["input_size"] == [32, 32, 3] and body["backend"] == "embedded"
    assert body["rollout"] is None  # no labels.json: the newest version takes all traffic


def test_health_and_readiness(gateway_client, exported_model) -> None:
    assert gateway_client.get("/healthz").status_code == 200
    ready = gateway_client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["version"] == exported_model.version


def test_real_photos_match_the_models_own_bytes_signature(
    gateway_client, exported_model, cifar_sample
) -> None:
    """The gateway's Pillow path and the SavedModel's in-graph decoding agree on real photos."""
    import tensorflow as tf

    sample = cifar_sample[:24]
    response = gateway_client.post(
        "/v1/predict?top_k=1", data=files(*((path.read_bytes(), path.name) for path, _ in sample))
    )
    assert response.status_code == 200
    predictions = response.get_json()["predictions"]
    assert [p["filename"] for p in predictions] == [path.name for path, _ in sample]
    gateway = np.array([list(p["probabilities"].values()) for p in predictions], dtype=np.float32)

    signature = tf.saved_model.load(str(exported_model.path)).signatures["serving_bytes"]
    reference = signature(image_bytes=tf.constant([path.read_bytes() for path, _ in sample]))
    np.testing.assert_allclose(gateway, reference["probabilities"].numpy(), atol=2e-3)


# -- bad input ----------------------------------------------------------------------------------


def test_no_file(gateway_client) -> None:
    assert_error(
        gateway_client.post("/v1/predict", data={"top_k": "3"}, content_type="multipart/form-data"),
        400,
        "no_file",
    )
    assert_error(gateway_client.post("/v1/predict"), 400, "no_file")


def test_empty_file(gateway_client) -> None:
    body = assert_error(gateway_client.post("/v1/predict", data=files((b"", "empty.png"))), 400, "empty_file")
    assert "empty.png" in body["error"]["message"]


def test_not_an_image(gateway_client) -> None:
    assert_error(
        gateway_client.post("/v1/predict", data=files((b"%PDF-1.4 not a picture" * 20, "doc.pdf"))),
        400,
        "not_an_image",
    )


def test_truncated_image(gateway_client) -> None:
    data = noise_png(3, size=128)
    assert_error(
        gateway_client.post("/v1/predict", data=files((data[: len(data) // 2], "cut.png"))),
        400,
        "truncated_image",
    )


def test_unsupported_image_format(gateway_client) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PCX")  # TIFF, WebP, MPO are taken (tests/serving/test_formats.py)
    assert_error(
        gateway_client.post("/v1/predict", data=files((buffer.getvalue(), "x.pcx"))),
        415,
        "unsupported_format",
    )


def test_unsupported_content_type(gateway_client) -> None:
    response = gateway_client.post("/v1/predict", data='{"image": "..."}', content_type="application/json")
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("top_k", ["0", "-1", "three", "11"])
def test_top_k_out_of_range(gateway_client, top_k: str) -> None:
    assert_error(
        gateway_client.post(f"/v1/predict?top_k={top_k}", data=files((png(), "a.png"))), 400, "invalid_top_k"
    )


def test_too_many_images(strict_app: Flask) -> None:
    response = strict_app.test_client().post(
        "/v1/predict", data=files(*[(png(), f"{i}.png") for i in range(3)])
    )
    body = assert_error(response, 400, "too_many_images")
    assert "2" in body["error"]["message"]


def test_upload_over_the_size_limit(strict_app: Flask) -> None:
    big = noise_png(4, size=256)  # ~200 KB of incompressible pixels, over the 64 KiB limit
    assert len(big) > 64 * 1024
    assert_error(
        strict_app.test_client().post("/v1/predict", data=files((big, "big.png"))), 413, "upload_too_large"
    )


def test_size_limit_is_checked_before_the_body_is_read(strict_app: Flask) -> None:
    class Untouchable(io.RawIOBase):
        read_bytes = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            Untouchable.read_bytes += len(buffer)
            raise AssertionError("the gateway read a body it should have refused")

    for content_type in ("image/png", "multipart/form-data; boundary=xyz"):
        environ = EnvironBuilder(path="/v1/predict", method="POST", content_type=content_type).get_environ()
        environ["CONTENT_LENGTH"] = str(10**9)
        environ["wsgi.input"] = Untouchable()
        _, status, _ = run_wsgi_app(strict_app, environ, buffered=True)
        assert status.startswith("413")
    assert Untouchable.read_bytes == 0


def test_decompression_bomb_is_refused(gateway_client) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 10_000))
        + chunk(b"IEND", b"")
    )
    start = time.perf_counter()
    assert_error(
        gateway_client.post("/v1/predict", data=files((bomb, "bomb.png"))), 413, "image_too_many_pixels"
    )
    assert time.perf_counter() - start < 1.0


def test_unknown_route_is_json_404(gateway_client) -> None:
    assert_error(gateway_client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(gateway_client.get("/v1/predict"), 405, "method_not_allowed")


# -- backend failures ---------------------------------------------------------------------------


class ExplodingBackend:
    kind = "test"

    def predict(self, images: np.ndarray, *, timeout_s: float | None = None) -> Prediction:
        raise RuntimeError("secret internal detail at /srv/model")

    def explain(
        self, images: np.ndarray, class_index: int | None = None, *, timeout_s: float | None = None
    ) -> Explanation:
        raise RuntimeError("secret internal detail at /srv/model")

    def status(self) -> ModelStatus:
        return ModelStatus(True, "m", 1, ("a",), "ok")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("route", ["/v1/predict", "/v1/explain"])
def test_unexpected_failure_is_a_500_without_details(route: str) -> None:
    response = (
        create_app(Settings(), backend=ExplodingBackend())
        .test_client()
        .post(route, data=files((png(), "a.png")))
    )
    assert_error(response, 500, "internal_error")
    assert "secret" not in response.get_data(as_text=True)


def test_backend_down_is_503_with_retry_after_quickly() -> None:
    closed_port = free_port()  # nothing listens there
    app = create_app(Settings(tfserving_address=f"127.0.0.1:{closed_port}", deadline_s=3.0))
    client = app.test_client()
    start = time.perf_counter()
    response = client.post("/v1/predict", data=files((png(), "a.png")))
    elapsed = time.perf_counter() - start
    assert_error(response, 503, "backend_unavailable")
    assert int(response.headers["Retry-After"]) >= 1
    assert elapsed < 2.0  # bounded retries, not a hang until the deadline
    assert client.get("/readyz").status_code == 503
    assert_error(client.get("/v1/models"), 503, "backend_unavailable")
    app.extensions["gateway.backend"].close()


# -- documentation and metrics ------------------------------------------------------------------


def test_openapi_documents_every_route(gateway_app: Flask, gateway_client) -> None:
    spec = gateway_client.get("/v1/openapi.json").get_json()
    assert gateway_client.get("/openapi.yaml").status_code == 200
    routes = {r.rule for r in gateway_app.url_map.iter_rules()} - {"/", "/static/<path:name>"}
    assert routes <= set(spec["paths"]), routes - set(spec["paths"])
    codes = spec["info"]["description"]
    for code in ("no_file", "empty_file", "not_an_image", "truncated_image", "unsupported_format",
                 "too_many_images", "upload_too_large", "image_too_many_pixels", "invalid_top_k",
                 "backend_unavailable", "backend_timeout"):  # fmt: skip
        assert code in codes


def _sample(text: str, name: str, **labels: str) -> float:
    return next(iter(sample_values(text, name, **labels)), 0.0)


def test_metrics_count_requests_errors_images_and_latency(gateway_client) -> None:
    before = gateway_client.get("/metrics").get_data(as_text=True)
    gateway_client.post("/v1/predict", data=files((png(), "a.png"), (png(), "b.png")))
    gateway_client.post("/v1/predict", data=files((b"", "e.png")))
    after = gateway_client.get("/metrics").get_data(as_text=True)

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("gateway_requests_total", route="/v1/predict", method="POST", status="200") == 1
    assert delta("gateway_requests_total", route="/v1/predict", method="POST", status="400") == 1
    assert delta("gateway_errors_total", code="empty_file") == 1
    assert delta("gateway_images_per_request_sum") == 2
    assert delta("gateway_backend_seconds_count", backend="embedded") == 1
    assert delta("gateway_request_seconds_count", route="/v1/predict") == 2


def test_models_says_what_the_version_was_trained_on(gateway_client, exported_model) -> None:
    import json

    card = gateway_client.get("/v1/models").get_json()["model_card"]
    metrics = json.loads((exported_model.run_dir / "metrics.json").read_text())
    assert card["dataset"] == "synthetic" and card["synthetic"] is True  # the session model's data
    assert card["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert card["architecture"] and card["created_at"]


def test_models_card_is_null_when_the_card_is_not_this_versions(exported_model, tmp_path) -> None:
    """A base holding another model's card under the same path (a stale copy) must not be quoted."""
    from tests.fixtures.exported import copy_model_base
    from tests.fixtures.gateway import embedded_gateway

    def other_version(card: dict) -> None:
        card["version"] = exported_model.version + 41

    base = copy_model_base(exported_model, tmp_path / "base", other_version)
    with embedded_gateway(base, exported_model.name) as app:
        body = app.test_client().get("/v1/models").get_json()
    assert body["version"] == exported_model.version and body["model_card"] is None
