"""benchmarks/lean_flask.py, the floor the gateway is measured beside, does the work it claims: the
upload decoded and resized, the LiteRT conversion of the published version, its probabilities out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract.signatures import IMAGES_KEY, PROBABILITIES_KEY, SERVING_DEFAULT
from tests.tfserving_double.tiny_model import CIFAR10_CLASSES, write_tiny_model

pytestmark = pytest.mark.slow  # saves, loads and converts a SavedModel


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
