"""GRPCClient against the strict TensorFlow Serving double serving the exported model."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from client.grpc import GRPCClient
from client.results import ClientError

pytestmark = pytest.mark.slow  # needs the exported model and a running gRPC server


@pytest.fixture(scope="module")
def client(tfserving_double) -> GRPCClient:
    with GRPCClient(tfserving_double.address, tfserving_double.model_name, timeout=30) as client:
        yield client


def _matrix(result, labels) -> np.ndarray:
    return np.array([[image.probabilities[label] for label in labels] for image in result.images])


def test_pixels_and_bytes_agree_on_real_photos(client, tfserving_double, exported_model, sample_images):
    by_pixels = client.predict(sample_images, top_k=3)
    by_bytes = client.predict(sample_images, top_k=3, use_bytes=True)
    assert (by_pixels.model_name, by_pixels.model_version) == (
        tfserving_double.model_name,
        tfserving_double.model_version,
    )
    assert [i.filename for i in by_pixels.images] == [p.name for p in sample_images]
    labels = list(by_pixels.images[0].probabilities)
    assert labels == list(exported_model.class_names) == list(by_bytes.images[0].probabilities)
    pixels, encoded = _matrix(by_pixels, labels), _matrix(by_bytes, labels)
    np.testing.assert_allclose(pixels.sum(axis=1), 1.0, rtol=1e-4)
    # Both paths feed the same integer pixels, up to a rounding step on resized JPEGs.
    np.testing.assert_allclose(pixels, encoded, atol=0.02)
    assert [i.label for i in by_pixels.images] == [i.label for i in by_bytes.images]


def test_top_k_is_sorted_and_consistent_with_probabilities(client, sample_images):
    (image,) = client.predict(sample_images[:1], top_k=4).images
    assert len(image.top_k) == 4
    probabilities = [p for _, p in image.top_k]
    assert probabilities == sorted(probabilities, reverse=True)
    assert image.top_k[0][1] == max(image.probabilities.values())
    assert all(image.probabilities[label] == p for label, p in image.top_k)


def test_status_and_metadata(client, tfserving_double):
    status = client.model_status()
    assert status.ready
    assert [(v.version, v.state) for v in status.versions] == [(tfserving_double.model_version, "AVAILABLE")]
    signatures = client.signature_defs()
    assert {"serving_default", "serving_bytes"} <= set(signatures)


def test_unknown_model_is_a_clear_not_found(tfserving_double, sample_images):
    with GRPCClient(tfserving_double.address, "no-such-model", timeout=10) as client:
        with pytest.raises(ClientError) as info:
            client.predict(sample_images[:1])
    assert info.value.code == "not_found"
    assert "no-such-model" in info.value.message and tfserving_double.address in info.value.message


def _predict_ids(double) -> list[str | None]:
    return [c.metadata.get("x-request-id") for c in double.server.received if c.method.endswith("/Predict")]


def test_every_predict_carries_a_request_id(client, tfserving_double, sample_images):
    """The caller's id reaches the server's metadata as given; without one, each call gets its own."""
    before = len(_predict_ids(tfserving_double))
    client.predict(sample_images[:1], request_id="order-42.retry_1")
    client.predict(sample_images[:1])
    client.predict(sample_images[:1], use_bytes=True)
    given, fresh, other = _predict_ids(tfserving_double)[before:]
    assert given == "order-42.retry_1"
    assert re.fullmatch(r"[0-9a-f]{32}", fresh) and re.fullmatch(r"[0-9a-f]{32}", other) and fresh != other


def test_a_failed_call_names_its_request_id(tfserving_double, sample_images):
    """The first predict also reads the signatures: that call carries the same id, and its failure
    (an unknown model) names it."""
    with GRPCClient(tfserving_double.address, "no-such-model", timeout=10) as client:
        with pytest.raises(ClientError) as info:
            client.predict(sample_images[:1], request_id="ticket-7")
    assert info.value.message.endswith("(request_id ticket-7)")
    assert tfserving_double.server.received[-1].metadata.get("x-request-id") == "ticket-7"


def test_a_request_id_the_gateway_would_replace_is_refused_before_any_call(sample_images):
    """The same rule as the gateway's X-Request-ID (contract/request_id.py), so one id is valid on both
    transports. Nothing listens at the address: a call made would fail as unavailable."""
    from tests.fixtures.gateway import free_port

    with GRPCClient(f"127.0.0.1:{free_port()}", "cifar10", timeout=5) as client:
        with pytest.raises(ClientError) as info:
            client.predict(sample_images[:1], request_id="ticket 7")
    assert info.value.code == "bad_request_id" and "'ticket 7'" in info.value.message


def test_missing_file_is_reported_before_any_call(client, tmp_path):
    with pytest.raises(ClientError) as info:
        client.predict([tmp_path / "nope.png"])
    assert info.value.code == "file_not_found" and "nope.png" in info.value.message


def test_deadline_exceeded_on_a_slow_server(tfserving_controls, sample_images):
    with GRPCClient(tfserving_controls.address, tfserving_controls.model_name, timeout=30) as client:
        client.predict(sample_images[:1])  # metadata cached: the next call is the Predict alone
        tfserving_controls.set_delay(2.0)
        started = time.monotonic()
        with pytest.raises(ClientError) as info:
            client.predict(sample_images[:1], timeout=0.5)
        elapsed = time.monotonic() - started
    assert info.value.code == "deadline_exceeded"
    assert "within 0.5 s" in info.value.message
    assert elapsed < 1.8  # gave up at the deadline, did not wait for the slow answer


def test_unavailable_is_retried_by_the_channel_policy(tfserving_controls, sample_images):
    with GRPCClient(tfserving_controls.address, tfserving_controls.model_name, max_attempts=4) as client:
        client.predict(sample_images[:1])
        tfserving_controls.fail_next(2)
        before = tfserving_controls.calls
        result = client.predict(sample_images[:1])
        assert result.model_name == tfserving_controls.model_name
        assert tfserving_controls.calls - before == 3  # two refusals retried, third attempt answered

        tfserving_controls.fail_next(100)
        before = tfserving_controls.calls
        with pytest.raises(ClientError) as info:
            client.predict(sample_images[:1])
        assert tfserving_controls.calls - before == 4  # maxAttempts, then the error
    assert info.value.code == "unavailable"


def test_down_server_gives_a_clear_error_after_retries(tfserving_controls, sample_images):
    with GRPCClient(tfserving_controls.address, tfserving_controls.model_name, timeout=10) as client:
        client.predict(sample_images[:1])
        tfserving_controls.set_down(True)
        started = time.monotonic()
        with pytest.raises(ClientError) as info:
            client.predict(sample_images[:1])
        assert time.monotonic() - started < 10  # refused fast, not hung until the deadline
        assert info.value.code == "unavailable"
        assert tfserving_controls.address in info.value.message
        assert "running" in info.value.message
        tfserving_controls.set_down(False)
        # Short reconnect backoff: the same client works again within a couple of seconds.
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.predict(sample_images[:1]).model_name == tfserving_controls.model_name
                break
            except ClientError:
                assert time.monotonic() < deadline, "client did not reconnect after the server came back"
                time.sleep(0.2)
