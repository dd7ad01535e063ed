"""Budgets per request (issue 13 item 1) through the real app and the real exported model:
the per-image pixel cap before decoding, the total-pixel budget, the end-to-end deadline, and
/v1/explain's own image cap and concurrency."""

from __future__ import annotations

import functools
import io
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from PIL import Image

from serving.app import create_app
from serving.config import Settings
from serving.explain import SLOTS_KEY
from tests.serving.test_images import png_header_only, sixteen_bit_gray_png

pytestmark = pytest.mark.slow  # the session's exported model


def noise_png(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def files(*items: tuple[bytes, str]) -> dict:
    return {"images": [(io.BytesIO(data), name) for data, name in items]}


def error_body(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code
    return error


def app_with(gateway_app: Flask, **overrides: object) -> Flask:
    """An app with these settings over the session's already-loaded model."""
    settings = replace(Settings(), **overrides)
    return create_app(settings, backend=gateway_app.extensions["gateway.backend"])


def test_the_default_pixel_cap_refuses_the_16_bit_png_bomb_fast_and_without_decoding(gateway_client):
    # Issue 13: an 80 KiB 16-bit PNG declaring 6324x6324 (40 Mpx, under the old 40 Mpx cap) took
    # about 3 s and 1 GiB to decode. Default settings now refuse it on its header.
    bomb = sixteen_bit_gray_png(6324, 6324)
    assert len(bomb) < 100 * 1024
    tracemalloc.start()
    start = time.perf_counter()
    try:
        response = gateway_client.post("/v1/predict", data=files((bomb, "deep.png")))
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    error = error_body(response, 413, "image_too_many_pixels")
    assert "'deep.png' declares 6324x6324 pixels" in error["message"]
    assert "GATEWAY_MAX_PIXELS" in error["message"]  # names the setting
    assert elapsed < 1.0
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated while refusing a header"


def test_the_total_pixel_budget_refuses_a_request_before_decoding_any_image(gateway_app):
    app = app_with(gateway_app, max_pixels=2_000_000, max_request_pixels=3_000_000)
    client = app.test_client()
    two = files((noise_png(1, (1500, 1000)), "a.png"), (noise_png(2, (1500, 1000)), "b.png"))
    assert client.post("/v1/predict", data=two).status_code == 200  # 3.0 Mpx: at the budget
    # A third image: each is under the per-image cap, together they are over the budget. The third
    # has no pixel data at all, so had decoding started this would be a 400 truncated_image.
    three = [
        (noise_png(1, (1500, 1000)), "a.png"),
        (noise_png(2, (1500, 1000)), "b.png"),
        (png_header_only(1500, 1000), "c.png"),
    ]
    error = error_body(client.post("/v1/predict", data=files(*three)), 413, "request_too_many_pixels")
    assert "4500000 pixels" in error["message"] and "GATEWAY_MAX_REQUEST_PIXELS" in error["message"]
    error_body(client.post("/v1/explain", data=files(*three)), 413, "request_too_many_pixels")


@functools.cache
def smooth_png(seed: int, size: int = 2000) -> bytes:
    """A size x size RGB gradient: small to send (it compresses well), real work to decode."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    across = np.add.outer(0 * ramp, ramp)
    channels = [np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 128, across]
    pixels = np.stack(channels, -1)
    pixels = (pixels + seed) % 256
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_a_request_past_its_deadline_stops_decoding_and_gets_504(gateway_app):
    # Eight 4 Mpx images take far longer to decode than the 50 ms deadline. The last has no pixel
    # data: a request that went on decoding after its deadline would end on it with 400
    # truncated_image, so the 504 shows the work stopped between images.
    app = app_with(gateway_app, request_deadline_s=0.05)
    images = [(smooth_png(0), f"{n}.png") for n in range(8)] + [(png_header_only(64, 64), "z.png")]
    response = app.test_client().post("/v1/predict", data=files(*images))
    error = error_body(response, 504, "deadline_exceeded")
    assert "GATEWAY_REQUEST_DEADLINE_S" in error["message"]


def test_decodes_wait_for_a_slot_within_the_deadline_then_get_504(gateway_app):
    from serving.uploads import DECODE_SLOTS_KEY

    app = app_with(gateway_app, decode_concurrency=1, request_deadline_s=0.3)
    client = app.test_client()
    image = [(noise_png(6, (64, 64)), "a.png")]
    assert client.post("/v1/predict", data=files(*image)).status_code == 200  # makes the slots
    slots = app.extensions[DECODE_SLOTS_KEY]
    assert slots.acquire(blocking=False)  # another request is decoding a full-size image
    try:
        start = time.perf_counter()
        error_body(client.post("/v1/predict", data=files(*image)), 504, "deadline_exceeded")
        assert 0.25 < time.perf_counter() - start < 2.0  # waited for its deadline, not for ever
    finally:
        slots.release()
    assert client.post("/v1/predict", data=files(*image)).status_code == 200


def test_a_request_within_its_deadline_is_answered(gateway_app):
    app = app_with(gateway_app, request_deadline_s=30.0)
    response = app.test_client().post("/v1/predict", data=files((noise_png(3, (64, 64)), "a.png")))
    assert response.status_code == 200, response.get_data(as_text=True)


def test_explain_has_its_own_lower_image_cap(gateway_app):
    app = app_with(gateway_app, max_images=8, max_explain_images=2)
    client = app.test_client()
    three = [(noise_png(seed, (40, 40)), f"{seed}.png") for seed in range(3)]
    error = error_body(client.post("/v1/explain", data=files(*three)), 400, "too_many_images")
    assert "3 images" in error["message"] and "limit 2" in error["message"]
    assert client.post("/v1/predict", data=files(*three)).status_code == 200
    assert client.post("/v1/explain", data=files(*three[:2])).status_code == 200


def test_explain_over_its_concurrency_is_503_with_retry_after_and_predict_still_answers(gateway_app):
    app = app_with(gateway_app, explain_concurrency=1)
    client = app.test_client()
    image = [(noise_png(4, (40, 40)), "a.png")]
    slots = app.extensions[SLOTS_KEY]
    assert slots.acquire(blocking=False)  # one explanation in flight takes the worker's only slot
    try:
        start = time.perf_counter()
        response = client.post("/v1/explain", data=files(*image))
        error = error_body(response, 503, "explain_busy")
        assert response.headers["Retry-After"] == "1"
        assert "GATEWAY_EXPLAIN_CONCURRENCY" in error["message"]
        assert time.perf_counter() - start < 1.0  # refused at once, not queued
        assert client.post("/v1/predict", data=files(*image)).status_code == 200
    finally:
        slots.release()
    assert client.post("/v1/explain", data=files(*image)).status_code == 200
    # Every answered or refused call gave its slot back.
    assert slots.acquire(blocking=False)
    slots.release()


def test_concurrent_explains_over_the_limit_are_refused_not_queued(gateway_app):
    """Real threads through a real server: with one slot, of several explanations sent at once
    those that find it taken get 503 explain_busy, and every one is answered either way."""
    import concurrent.futures

    import requests

    from tests.fixtures.gateway import serve_in_thread

    app = app_with(gateway_app, explain_concurrency=1, max_explain_images=8)
    images = [("images", (f"{seed}.png", noise_png(seed, (400, 400)), "image/png")) for seed in range(8)]
    with serve_in_thread(app) as url, concurrent.futures.ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(requests.post, f"{url}/v1/explain", files=images, timeout=60) for _ in range(6)]
        statuses = sorted(call.result().status_code for call in calls)
    assert set(statuses) <= {200, 503} and statuses[0] == 200, statuses
    assert 503 in statuses, statuses


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("GATEWAY_MAX_REQUEST_PIXELS", "12"),
        ("GATEWAY_REQUEST_DEADLINE_S", "0"),
        ("GATEWAY_MAX_EXPLAIN_IMAGES", "zero"),
        ("GATEWAY_EXPLAIN_CONCURRENCY", "0"),
        ("GATEWAY_DECODE_CONCURRENCY", "-1"),
    ],
)
def test_bad_budget_settings_are_refused_naming_the_variable(variable: str, raw: str) -> None:
    from serving.config import ConfigError

    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: raw})


def test_budget_settings_are_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "GATEWAY_MAX_REQUEST_PIXELS": "5000000",
            "GATEWAY_REQUEST_DEADLINE_S": "2.5",
            "GATEWAY_MAX_EXPLAIN_IMAGES": "4",
            "GATEWAY_EXPLAIN_CONCURRENCY": "3",
            "GATEWAY_DECODE_CONCURRENCY": "1",
        }
    )
    assert (settings.max_request_pixels, settings.request_deadline_s) == (5_000_000, 2.5)
    assert (settings.max_explain_images, settings.explain_concurrency) == (4, 3)
    assert settings.decode_concurrency == 1
    assert Settings().max_pixels < 40_000_000  # issue 13: the old cap let the 16-bit bomb through


# -- the exported bytes signatures (trainer/export/graph_image/decode.py) ------------------------


@pytest.mark.parametrize("signature", ["serving_bytes", "explain_bytes"])
def test_the_bytes_signatures_refuse_a_huge_declared_size_before_decoding(exported_session, signature):
    """As TF Serving runs the SavedModel (session loader): a small PNG declaring 20000x20000 is
    INVALID_ARGUMENT on its header; it used to be decoded first, gigabytes for a 100 KiB upload."""
    import tensorflow as tf

    from contract.signatures import MAX_PIXELS

    inputs = {"image_bytes": np.array([png_header_only(20000, 20000)], dtype=object)}
    if signature == "explain_bytes":
        inputs["class_index"] = np.array([-1], dtype=np.int32)
    # The header-only PNG could not be decoded at all: this message is the header check's.
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"image declares over {MAX_PIXELS} pixels"):
        exported_session.run(signature, inputs)
    # The 16-bit bomb of issue 13 (valid, 40 Mpx: it decodes in about a second and 80 MB when let
    # through), while an ordinary photo still runs.
    inputs["image_bytes"] = np.array([sixteen_bit_gray_png(6324, 6324)], dtype=object)
    with pytest.raises(tf.errors.InvalidArgumentError, match="declares over"):
        exported_session.run(signature, inputs)
    inputs["image_bytes"] = np.array([noise_png(5, (300, 200))], dtype=object)
    assert exported_session.run(signature, inputs)["probabilities"].shape == (1, 10)


def test_the_api_document_names_the_budget_errors() -> None:
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "serving" / "openapi.yaml").read_text())
    codes = spec["info"]["description"]
    for code in ("request_too_many_pixels", "deadline_exceeded", "explain_busy", "image_too_many_pixels"):
        assert code in codes
    text = yaml.safe_dump(spec)
    for variable in ("MAX_REQUEST_PIXELS", "REQUEST_DEADLINE_S", "MAX_EXPLAIN_IMAGES", "EXPLAIN_CONCURRENCY"):
        assert f"GATEWAY_{variable}" in text
    explain = spec["paths"]["/v1/explain"]["post"]["responses"]
    assert "Retry-After" in str(spec["components"]["responses"][explain["503"]["$ref"].rsplit("/", 1)[1]])
