"""POST /v1/explain: overlays drawn from the exported Grad-CAM signature, identical answers from both
backends, the same errors as /v1/predict, 501 for models exported without the signature, and the
web page showing the overlay next to the bars."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from flask import Flask
from PIL import Image

from serving.overlay import VIEW_SIZE, overlay, overlay_png_base64

# ---------------------------------------------------------------- overlay rendering (fast, no model)


def _upsampled(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((VIEW_SIZE, VIEW_SIZE), Image.BILINEAR))


def test_overlay_without_heat_is_the_plain_upsampled_image():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(overlay(image, np.zeros((32, 32))), _upsampled(image))


def test_heat_paints_its_region_red_and_leaves_the_rest_alone():
    image = np.full((32, 32, 3), 128, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[:12, :12] = 1.0  # top-left hot
    out = overlay(image, heat).astype(int)
    hot, cold = out[:30, :30], out[-60:, -60:]
    assert np.all(hot[..., 0] > 180) and np.all(hot[..., 2] < 80), "hot region should be red"
    np.testing.assert_array_equal(cold, 128)


def test_overlay_png_is_base64_png_of_the_viewing_size():
    image = np.zeros((32, 32, 3), np.uint8)
    decoded = Image.open(io.BytesIO(base64.b64decode(overlay_png_base64(image, np.ones((32, 32))))))
    assert decoded.format == "PNG" and decoded.size == (VIEW_SIZE, VIEW_SIZE) and decoded.mode == "RGB"


def test_overlay_refuses_arrays_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"RGB image \[H, W, 3\] and a heatmap \[h, w\]"):
        overlay(np.zeros((32, 32)), np.zeros((32, 32)))


# ---------------------------------------------------------------- the endpoint on the exported model


@pytest.fixture(scope="module")
def shapes() -> tuple[np.ndarray, list[bytes]]:
    """Four synthetic shape images (what the test model was trained on) and their PNG encodings."""
    from trainer.data.synthetic import generate

    pixels, _ = generate(4, seed=321)
    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return pixels, encoded


def _form(encoded: list[bytes]) -> dict:
    return {"images": [(io.BytesIO(data), f"shape-{i}.png") for i, data in enumerate(encoded)]}


def _post(client, path: str, encoded: list[bytes], query: str = ""):
    return client.post(f"{path}{query}", data=_form(encoded), content_type="multipart/form-data")


def _overlay_pixels(entry: dict) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(entry["overlay_png"])))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_explain_ranks_like_predict_and_draws_the_signatures_heatmap(
    gateway_client, exported_model, exported_session, shapes
):
    pixels, encoded = shapes
    predicted = _post(gateway_client, "/v1/predict", encoded, "?top_k=3").get_json()
    response = _post(gateway_client, "/v1/explain", encoded, "?top_k=3")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["model"] == {"name": exported_model.name, "version": exported_model.version}
    reference = exported_session.run(
        "explain", {"images": pixels.astype(np.float32), "class_index": np.full(4, -1, np.int32)}
    )
    for i, (entry, expected) in enumerate(zip(body["explanations"], predicted["predictions"], strict=True)):
        assert entry["filename"] == f"shape-{i}.png"
        assert [t["label"] for t in entry["top_k"]] == [t["label"] for t in expected["top_k"]]
        for label, p in expected["probabilities"].items():
            assert entry["probabilities"][label] == pytest.approx(p, abs=1e-5)
        assert entry["explained_class"] == entry["top_k"][0]["label"]
        assert entry["overlay_size"] == [VIEW_SIZE, VIEW_SIZE]
        # The overlay is the heatmap TF Serving would compute, drawn over the pixels the model saw
        # (float noise between two runs of the graph may move a value by one level).
        drawn = _overlay_pixels(entry).astype(int)
        assert drawn.shape == (VIEW_SIZE, VIEW_SIZE, 3)
        assert np.abs(drawn - overlay(pixels[i], reference["heatmap"][i]).astype(int)).max() <= 1


@pytest.mark.slow
def test_a_chosen_class_is_explained_by_name_or_index(
    gateway_client, exported_model, exported_session, shapes
):
    pixels, encoded = shapes
    index = 2
    name = exported_model.class_names[index]
    by_name = _post(gateway_client, "/v1/explain", encoded, f"?top_k=1&class={name}")
    by_index = _post(gateway_client, "/v1/explain", encoded, f"?top_k=1&class={index}")
    assert by_name.status_code == 200, by_name.get_json()
    reference = exported_session.run(
        "explain", {"images": pixels.astype(np.float32), "class_index": np.full(4, index, np.int32)}
    )
    for i, (a, b) in enumerate(
        zip(by_name.get_json()["explanations"], by_index.get_json()["explanations"], strict=True)
    ):
        assert a["explained_class"] == b["explained_class"] == name
        assert np.abs(_overlay_pixels(a).astype(int) - overlay(pixels[i], reference["heatmap"][i])).max() <= 1
        assert np.abs(_overlay_pixels(a).astype(int) - _overlay_pixels(b).astype(int)).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("value", ["no-such-class", "10", "-1", "1.5"])
def test_an_unknown_class_is_400_naming_the_classes(gateway_client, exported_model, shapes, value):
    _, encoded = shapes
    response = _post(gateway_client, "/v1/explain", encoded[:1], "?" + urlencode({"class": value}))
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_class"
    assert repr(value) in error["message"] and exported_model.class_names[-1] in error["message"]


def _pcx() -> bytes:  # an image format the gateway does not take (415)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PCX")
    return buffer.getvalue()


MULTIPART = "multipart/form-data"


def _one(data: bytes, name: str) -> dict:
    return {"data": {"images": (io.BytesIO(data), name)}, "content_type": MULTIPART}


def _top_k(png: list[bytes], value: str) -> dict:
    return {"data": _form(png[:1]), "content_type": MULTIPART, "query_string": {"top_k": value}}


# name -> request arguments built from the shape PNGs; built per request because posting a form
# consumes its file objects.
BAD_REQUESTS = {
    "no file": lambda png: {"data": {}, "content_type": MULTIPART},
    "empty file": lambda png: _one(b"", "e.png"),
    "not an image": lambda png: _one(b"hi" * 50, "a.png"),
    "truncated": lambda png: _one(png[0][:60], "cut.png"),
    "pcx": lambda png: _one(_pcx(), "a.pcx"),
    "json body": lambda png: {"data": b"{}", "content_type": "application/json"},
    "top_k 0": lambda png: _top_k(png, "0"),
    "top_k 99": lambda png: _top_k(png, "99"),
    # Over predict's cap too (explain has its own, lower one: tests/serving/test_budgets.py).
    "too many": lambda png: {"data": _form(png * 20), "content_type": MULTIPART},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_requests_get_the_same_errors_as_predict(gateway_client, shapes, name):
    _, encoded = shapes
    answers = []
    for path in ("/v1/predict", "/v1/explain"):
        response = gateway_client.post(path, **BAD_REQUESTS[name](encoded))
        error = response.get_json()["error"]
        answers.append((response.status_code, error["code"]))
    # Same status and code; messages may name different limits (explain's image cap is lower).
    assert answers[0] == answers[1]
    assert 400 <= answers[1][0] < 500, answers[1]


@pytest.fixture(scope="module")
def tfserving_explain_app(tfserving_double) -> Iterator[Flask]:
    from serving.app import create_app
    from serving.config import Settings

    app = create_app(
        Settings(
            tfserving_address=tfserving_double.address, model_name=tfserving_double.model_name, deadline_s=30
        )
    )
    yield app
    app.extensions["gateway.backend"].close()


@pytest.mark.slow
def test_tfserving_backend_explains_over_grpc_like_the_embedded_one(
    gateway_client, tfserving_explain_app, shapes
):
    _, encoded = shapes
    embedded = _post(gateway_client, "/v1/explain", encoded).get_json()
    response = _post(tfserving_explain_app.test_client(), "/v1/explain", encoded)
    assert response.status_code == 200, response.get_json()
    remote = response.get_json()
    assert remote["model"] == embedded["model"]
    for a, b in zip(remote["explanations"], embedded["explanations"], strict=True):
        assert a["explained_class"] == b["explained_class"]
        assert a["top_k"][0]["label"] == b["top_k"][0]["label"]
        assert np.abs(_overlay_pixels(a).astype(int) - _overlay_pixels(b).astype(int)).max() <= 1
    chosen = _post(tfserving_explain_app.test_client(), "/v1/explain", encoded, "?class=1").get_json()
    second_class = list(remote["explanations"][0]["probabilities"])[1]  # class order = model order
    assert {e["explained_class"] for e in chosen["explanations"]} == {second_class}


@pytest.fixture(scope="module")
def base_without_explain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model base whose only version has no conv layer, hence no explain signature."""
    import keras

    from trainer.export.savedmodel import export_savedmodel

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    base = tmp_path_factory.mktemp("no-explain")
    export_savedmodel(model, ["a", "b", "c"], base / "flat" / "1")
    return base


@pytest.mark.slow
def test_a_model_without_the_signature_is_501_from_both_backends(base_without_explain, shapes):
    from serving.app import create_app
    from serving.config import Settings
    from tests.tfserving_double import TFServingDouble

    _, encoded = shapes
    double = TFServingDouble(base_without_explain).start()
    apps = [
        create_app(Settings(model_base_path=base_without_explain, model_name="flat", poll_interval_s=60)),
        create_app(Settings(tfserving_address=double.address, model_name="flat", deadline_s=30)),
    ]
    try:
        for app in apps:
            client = app.test_client()
            assert _post(client, "/v1/predict", encoded[:1], "?top_k=1").status_code == 200
            response = _post(client, "/v1/explain", encoded[:1], "?top_k=1")
            assert response.status_code == 501, response.get_json()
            error = response.get_json()["error"]
            assert error["code"] == "explain_unsupported"
            assert "re-export" in error["message"]
    finally:
        for app in apps:
            app.extensions["gateway.backend"].close()
        double.stop()


# ---------------------------------------------------------------- the web page

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def page_url(gateway_app) -> Iterator[str]:
    from tests.fixtures.gateway import serve_in_thread

    with serve_in_thread(gateway_app) as url:
        yield url


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent; install Debian's chromium package")
def test_page_shows_the_overlay_next_to_the_bars(page_url, shapes, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    _, encoded = shapes
    path = tmp_path / "shape.png"
    path.write_bytes(encoded[0])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"]
        )
        try:
            page = browser.new_page()
            page.goto(page_url)
            page.set_input_files("#file-input", str(path))
            card = page.locator(".result")
            expect(card).to_have_count(1, timeout=20_000)
            expect(card.locator(".bar-row")).to_have_count(10)
            explanation = card.locator(".explanation")
            expect(explanation).to_be_visible(timeout=20_000)
            expect(explanation).to_contain_text("Grad-CAM")
            background = explanation.locator(".overlay").evaluate("el => el.style.backgroundImage")
            assert background.startswith('url("data:image/png;base64,')
            # The page shows what the gateway drew, byte for byte.
            data = background.split(",", 1)[1].rstrip('")')
            assert Image.open(io.BytesIO(base64.b64decode(data))).size == (VIEW_SIZE, VIEW_SIZE)
        finally:
            browser.close()
