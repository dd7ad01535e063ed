"""The TensorFlow Serving backend against the strict gRPC double (tests/tfserving_double)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from PIL import Image

from serving.app import create_app
from serving.config import Settings

pytestmark = pytest.mark.slow  # starts a gRPC server with a SavedModel


def upload(paths: list[Path]) -> dict:
    return {"images": [(io.BytesIO(p.read_bytes()), p.name) for p in paths]}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 90)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tfserving_app(tfserving_double) -> Flask:
    app = create_app(
        Settings(
            tfserving_address=tfserving_double.address, model_name=tfserving_double.model_name, deadline_s=1.0
        )
    )
    yield app
    app.extensions["gateway.backend"].close()


def test_answers_equal_the_embedded_backend_on_real_photos(
    tfserving_app: Flask,
    gateway_app: Flask,
    tfserving_double,
    cifar_sample,
) -> None:
    paths = [path for path, _ in cifar_sample[:16]]
    via_tfserving = tfserving_app.test_client().post("/v1/predict?top_k=2", data=upload(paths))
    embedded = gateway_app.test_client().post("/v1/predict?top_k=2", data=upload(paths))
    assert via_tfserving.status_code == 200 and embedded.status_code == 200
    a, b = via_tfserving.get_json(), embedded.get_json()
    assert a["model"] == {"name": "cifar10", "version": tfserving_double.model_version}  # from the response
    for left, right in zip(a["predictions"], b["predictions"], strict=True):
        assert left["filename"] == right["filename"]
        assert list(left["probabilities"]) == list(right["probabilities"])
        np.testing.assert_allclose(
            list(left["probabilities"].values()), list(right["probabilities"].values()), atol=1e-5
        )


def test_readiness_and_models_come_from_model_status(tfserving_app: Flask, tfserving_double) -> None:
    client = tfserving_app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["version"] == tfserving_double.model_version
    models = client.get("/v1/models").get_json()
    assert models["backend"] == "tfserving" and len(models["class_names"]) == 10


def test_models_card_needs_the_shared_model_volume(tfserving_double, tmp_path) -> None:
    """With the volume TF Serving reads mounted (compose does), the card is quoted; without, null."""
    cards = []
    for base in (tfserving_double.model_base, tmp_path / "not-mounted"):
        app = create_app(
            Settings(
                tfserving_address=tfserving_double.address,
                model_name=tfserving_double.model_name,
                model_base_path=base,
            )
        )
        try:
            cards.append(app.test_client().get("/v1/models").get_json()["model_card"])
        finally:
            app.extensions["gateway.backend"].close()
    assert cards[0]["synthetic"] is True and cards[1] is None


def test_unknown_model_is_not_ready(tfserving_double) -> None:
    app = create_app(Settings(tfserving_address=tfserving_double.address, model_name="no-such-model"))
    client = app.test_client()
    assert client.get("/readyz").status_code == 503
    response = client.post("/v1/predict", data=png(), content_type="image/png")
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "backend_unavailable"
    app.extensions["gateway.backend"].close()


def test_unavailable_is_retried_other_errors_are_not(tfserving_app: Flask, tfserving_controls) -> None:
    server = tfserving_controls
    client = tfserving_app.test_client()
    try:
        server.fail_next(2)
        calls = server.calls
        response = client.post("/v1/predict", data=png(), content_type="image/png")
        assert response.status_code == 200
        assert server.calls - calls == 3  # two UNAVAILABLE answers, then success

        wrong_signature = create_app(
            Settings(tfserving_address=tfserving_controls.address, tfserving_signature="no_such_signature")
        )
        calls = server.calls
        response = wrong_signature.test_client().post("/v1/predict", data=png(), content_type="image/png")
        assert response.status_code == 502 and response.get_json()["error"]["code"] == "backend_error"
        assert server.calls - calls == 1
        wrong_signature.extensions["gateway.backend"].close()
    finally:
        server.fail_next(0)


def test_slow_backend_is_504_at_the_deadline(tfserving_app: Flask, tfserving_controls) -> None:
    tfserving_controls.set_delay(3.0)
    start = time.perf_counter()
    response = tfserving_app.test_client().post("/v1/predict", data=png(), content_type="image/png")
    elapsed = time.perf_counter() - start
    assert response.status_code == 504 and response.get_json()["error"]["code"] == "backend_timeout"
    assert 0.9 < elapsed < 2.5  # the 1 s deadline, not the 3 s delay


def test_backend_down_is_503_then_recovers(tfserving_app: Flask, tfserving_controls) -> None:
    client = tfserving_app.test_client()
    tfserving_controls.set_down(True)
    start = time.perf_counter()
    response = client.post("/v1/predict", data=png(), content_type="image/png")
    assert response.status_code == 503 and "Retry-After" in response.headers
    assert time.perf_counter() - start < 2.0  # within the 1 s deadline, plus slack for a busy machine
    assert client.get("/readyz").status_code == 503
    tfserving_controls.set_down(False)
    deadline = time.monotonic() + 10
    while client.post("/v1/predict", data=png(), content_type="image/png").status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not reconnect to the restarted backend"
        time.sleep(0.2)


def test_batches_over_4_mib_on_the_wire_go_through(tfserving_double) -> None:
    # gRPC's default 4 MiB receive limit would refuse such a request at a server left at defaults.
    from serving.backends.tfserving import TFServingBackend

    backend = TFServingBackend(tfserving_double.address, tfserving_double.model_name, deadline_s=60)
    try:
        images = np.random.default_rng(0).integers(0, 256, (360, 32, 32, 3), dtype=np.uint8)
        assert images.size * 4 > 4 * 1024 * 1024  # as float32 on the wire
        prediction = backend.predict(images)
        assert prediction.probabilities.shape == (360, len(prediction.class_names))
        assert prediction.model_version == tfserving_double.model_version
    finally:
        backend.close()


def test_readiness_names_a_newer_version_that_failed_to_load(tmp_path) -> None:
    """TF Serving keeps serving version 1 when version 2 is corrupt; /readyz stays 200 and says so."""
    from tests.tfserving_double import TFServingDouble
    from tests.tfserving_double.tiny_model import write_tiny_model

    write_tiny_model(tmp_path, "m", 1, seed=1)
    with TFServingDouble(tmp_path, poll_interval_s=0.1) as double:
        app = create_app(Settings(tfserving_address=double.address, model_name="m", model_base_path=tmp_path))
        try:
            client = app.test_client()
            assert client.get("/readyz").get_json()["failed_versions"] == {}
            staging = tmp_path / "m" / ".2-staging"
            staging.mkdir()
            (staging / "saved_model.pb").write_bytes(b"not a SavedModel")
            staging.rename(tmp_path / "m" / "2")
            deadline = time.monotonic() + 30
            while not (body := client.get("/readyz").get_json())["failed_versions"]:
                assert time.monotonic() < deadline, body
                time.sleep(0.1)
            ready = client.get("/readyz")
            assert ready.status_code == 200 and body["version"] == 1
            assert body["failed_versions"]["2"].startswith("DATA_LOSS: Can't parse")
            assert "2 failed to load" in body["detail"]
        finally:
            app.extensions["gateway.backend"].close()
