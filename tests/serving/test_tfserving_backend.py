"""The TensorFlow Serving backend against the strict gRPC double (tests/tfserving_double): answers,
readiness, deadlines, overload control (no retry of shed load, retry budget, circuit breaker) and
TLS / mutual TLS to a real TLS gRPC server."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from PIL import Image

from serving.app import create_app
from serving.backends.base import BackendTimeout
from serving.backends.tfserving import TFServingBackend
from serving.config import ConfigError, Settings
from tests.fixtures.tls import PKI, make_pki

pytestmark = pytest.mark.slow  # starts a gRPC server with a SavedModel


def upload(paths: list[Path]) -> dict:
    return {"images": [(io.BytesIO(p.read_bytes()), p.name) for p in paths]}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def warm(address: str, model_name: str, **tls: object) -> None:
    """One prediction with a generous deadline: the double's first Predict builds the model's
    function (about 1 s, more on a busy machine), which the 1 s deadlines below must not pay."""
    backend = TFServingBackend(address, model_name, deadline_s=120, **tls)
    try:
        backend.predict(np.zeros((1, 32, 32, 3), np.uint8))
        backend.predict(np.zeros((16, 32, 32, 3), np.uint8))
    finally:
        backend.close()


@pytest.fixture(scope="module")
def tfserving_app(tfserving_double) -> Flask:
    warm(tfserving_double.address, tfserving_double.model_name)
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


def breaker_state() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("gateway_breaker_state", {"backend": "tfserving"})


def test_shed_load_is_503_at_once_and_never_retried(tfserving_app: Flask, tfserving_controls) -> None:
    """TF Serving's full batching queue answers UNAVAILABLE; retrying would only add to its load."""
    client = tfserving_app.test_client()
    tfserving_controls.server.shed_next(1)
    calls = tfserving_controls.calls
    response = client.post("/v1/predict", data=png(), content_type="image/png")
    assert tfserving_controls.calls - calls == 1  # not retried
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    error = response.get_json()["error"]
    assert error["code"] == "backend_unavailable" and "overloaded" in error["message"]
    assert "batch scheduling queue" not in error["message"]  # the server's words stay in the log
    assert client.post("/v1/predict", data=png(), content_type="image/png").status_code == 200


def test_retries_stay_within_the_retry_budget(tfserving_controls) -> None:
    app = create_app(
        Settings(
            tfserving_address=tfserving_controls.address,
            model_name=tfserving_controls.model_name,
            deadline_s=2.0,
            retry_budget_ratio=0.1,
            breaker_failures=1000,  # this test is about the budget alone
        )
    )
    client = app.test_client()
    try:
        tfserving_controls.fail_next(10_000)
        calls = tfserving_controls.calls
        for _ in range(20):
            assert client.post("/v1/predict", data=png(), content_type="image/png").status_code == 503
        attempts = tfserving_controls.calls - calls
        # Up to 5 attempts per call before: 100. Now the 20 calls, a reserve of 3 and 10 % of 20.
        assert 20 <= attempts <= 20 + 3 + 2, attempts
    finally:
        tfserving_controls.fail_next(0)
        app.extensions["gateway.backend"].close()


def test_circuit_breaker_fails_fast_then_probes_and_closes(tfserving_controls) -> None:
    app = create_app(
        Settings(
            tfserving_address=tfserving_controls.address,
            model_name=tfserving_controls.model_name,
            breaker_failures=3,
            breaker_open_s=1.0,
        )
    )
    client = app.test_client()
    try:
        tfserving_controls.fail_next(10_000)
        for _ in range(3):
            assert client.post("/v1/predict", data=png(), content_type="image/png").status_code == 503
        assert breaker_state() == 2  # open
        calls = tfserving_controls.calls
        start = time.perf_counter()
        response = client.post("/v1/predict", data=png(), content_type="image/png")
        assert time.perf_counter() - start < 0.5 and tfserving_controls.calls == calls  # no call made
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "circuit breaker open" in response.get_json()["error"]["message"]
        tfserving_controls.fail_next(0)
        time.sleep(1.1)
        assert client.post("/v1/predict", data=png(), content_type="image/png").status_code == 200  # probe
        assert breaker_state() == 0  # closed
    finally:
        tfserving_controls.fail_next(0)
        app.extensions["gateway.backend"].close()


def test_timeout_s_caps_the_deadline_without_tripping_the_breaker(tfserving_controls) -> None:
    backend = TFServingBackend(
        tfserving_controls.address, tfserving_controls.model_name, deadline_s=30, breaker_failures=1
    )
    try:
        tfserving_controls.set_delay(2.0)
        start = time.perf_counter()
        with pytest.raises(BackendTimeout, match="within 0.3 s"):
            backend.predict(np.zeros((1, 32, 32, 3), np.uint8), timeout_s=0.3)
        assert time.perf_counter() - start < 1.5
        # The caller's short budget ran out, not TF Serving's health: the breaker stays closed.
        assert backend.breaker.state == "closed"
    finally:
        backend.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def mtls_double(exported_model, pki: PKI):
    """The double serving TLS only and requiring client certificates signed by the test CA."""
    from tests.tfserving_double import TFServingDouble

    with TFServingDouble(
        exported_model.base_path,
        tls_key_and_cert=pki.server_key_and_cert(),
        tls_client_ca=pki.ca.read_bytes(),
    ) as double:
        warm(
            double.address,
            exported_model.name,
            tls_ca=pki.ca,
            tls_cert=pki.client_cert,
            tls_key=pki.client_key,
        )
        yield double


def tls_app(address: str, model_name: str, **env: str) -> Flask:
    environ = {"GATEWAY_TFSERVING_ADDRESS": address, "GATEWAY_MODEL_NAME": model_name, **env}
    return create_app(Settings.from_env(environ))


def test_mutual_tls_to_tfserving(mtls_double, exported_model, pki: PKI) -> None:
    app = tls_app(
        mtls_double.address,
        exported_model.name,
        GATEWAY_TFSERVING_TLS_CA=str(pki.ca),
        GATEWAY_TFSERVING_TLS_CERT=str(pki.client_cert),
        GATEWAY_TFSERVING_TLS_KEY=str(pki.client_key),
    )
    try:
        client = app.test_client()
        assert client.get("/readyz").status_code == 200
        response = client.post("/v1/predict", data=png(), content_type="image/png")
        assert response.status_code == 200
        assert response.get_json()["model"]["version"] == exported_model.version
    finally:
        app.extensions["gateway.backend"].close()


@pytest.mark.parametrize("with_ca", [False, True], ids=["plaintext", "tls-without-client-cert"])
def test_tls_mismatch_is_refused_with_a_clear_log(mtls_double, exported_model, pki, with_ca, caplog) -> None:
    caplog.set_level(logging.INFO, logger="serving")
    env = {"GATEWAY_TFSERVING_TLS_CA": str(pki.ca)} if with_ca else {}
    app = tls_app(mtls_double.address, exported_model.name, **env)
    try:
        response = app.test_client().post("/v1/predict", data=png(), content_type="image/png")
        assert response.status_code == 503
        text = response.get_data(as_text=True)
        assert mtls_double.address not in text and "ssl" not in text.lower()
        request_id = response.headers["X-Request-ID"]
        logged = " ".join(r.getMessage() for r in caplog.records if request_id in r.getMessage())
        # The log names the address, gRPC's own reason, and which settings to check.
        assert mtls_double.address in logged and "GATEWAY_TFSERVING_TLS_CA" in logged, logged
    finally:
        app.extensions["gateway.backend"].close()


def test_tls_settings_are_checked_at_start(pki: PKI, tmp_path) -> None:
    base = {"GATEWAY_TFSERVING_ADDRESS": "127.0.0.1:8500"}
    with pytest.raises(ConfigError, match="GATEWAY_TFSERVING_TLS_CA="):
        Settings.from_env({**base, "GATEWAY_TFSERVING_TLS_CA": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="GATEWAY_TFSERVING_TLS_KEY"):
        Settings.from_env({**base, "GATEWAY_TFSERVING_TLS_CERT": str(pki.client_cert)})
    settings = Settings.from_env({**base, "GATEWAY_TFSERVING_TLS_CA": str(pki.ca)})
    assert settings.tfserving_tls_ca == pki.ca and settings.tfserving_tls_cert is None
