"""benchmarks/lean_flask.py, the lean app the gateway is measured beside, does the work it claims: the
upload decoded and resized, the LiteRT conversion of the published version, its probabilities out;
and with model=False the same route with no model at all."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.signatures import IMAGES_KEY, PROBABILITIES_KEY, SERVING_DEFAULT
from tests.tfserving_double.tiny_model import CIFAR10_CLASSES, write_tiny_model


@pytest.mark.slow  # saves, loads and converts a SavedModel
def test_it_answers_the_versions_probabilities_for_an_upload(tmp_path: Path, monkeypatch) -> None:
    import tensorflow as tf

    from benchmarks import lean_flask

    version = write_tiny_model(tmp_path, "cifar10", 1, ood=True)
    (version / "assets.extra").mkdir(exist_ok=True)
    (version / "assets.extra" / "model_card.json").write_text(json.dumps({"class_names": CIFAR10_CLASSES}))
    monkeypatch.setenv("LEAN_MODEL_DIR", str(version))
    app = lean_flask.create_app()

    # 48x40 pixels: the app must resize to the model's 32x32 before calling it.
    pixels = np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    answer = app.test_client().post(
        "/predict", data={"images": (io.BytesIO(png.getvalue()), "x.png")}, content_type="multipart/form-data"
    )
    assert answer.status_code == 200, answer.data
    got = answer.get_json()
    assert list(got) == list(CIFAR10_CLASSES)

    resized = Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR)
    batch = np.asarray(resized, dtype=np.float32)[np.newaxis]
    signature = tf.saved_model.load(str(version)).signatures[SERVING_DEFAULT]
    expected = signature(**{IMAGES_KEY: tf.constant(batch)})[PROBABILITIES_KEY].numpy()[0]
    np.testing.assert_allclose([got[name] for name in CIFAR10_CLASSES], expected, atol=1e-5)


def test_without_a_model_it_decodes_the_upload_and_answers_uniform_probabilities(
    tmp_path: Path, monkeypatch
) -> None:
    from benchmarks import lean_flask

    # A version folder with its model card and no SavedModel: model=False must not load one.
    (tmp_path / "assets.extra").mkdir()
    (tmp_path / "assets.extra" / "model_card.json").write_text(json.dumps({"class_names": CIFAR10_CLASSES}))
    monkeypatch.setenv("LEAN_MODEL_DIR", str(tmp_path))
    client = lean_flask.create_app(model=False).test_client()

    png = io.BytesIO()
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(png, format="PNG")
    answer = client.post(
        "/predict", data={"images": (io.BytesIO(png.getvalue()), "x.png")}, content_type="multipart/form-data"
    )
    assert answer.status_code == 200, answer.data
    assert answer.get_json() == pytest.approx({name: 0.1 for name in CIFAR10_CLASSES})
    # It still decodes: bytes that are no image fail there (a bare 500: the lean app handles nothing).
    broken = client.post("/predict", data={"images": (io.BytesIO(b"not an image"), "x.png")},
                         content_type="multipart/form-data")  # fmt: skip
    assert broken.status_code == 500
