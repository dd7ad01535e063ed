"""The exported SavedModel, loaded the way TensorFlow Serving loads it, honours the signature contract."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tfserving_session import SignatureError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(exported_session):
    return exported_session


@pytest.fixture(scope="module")
def keras_model(exported_model):
    import keras

    import trainer.models  # noqa: F401  (custom layers, if the trained model uses any)

    return keras.saving.load_model(exported_model.run_dir / "model.keras", compile=False)


def test_signature_defs_have_the_contracted_keys_dtypes_and_shapes(session, exported_model):
    num_classes = len(exported_model.class_names)
    sigs = session.signature_defs
    assert {"serving_default", "serving_bytes"} <= set(sigs)

    images = sigs["serving_default"].inputs["images"]
    assert images.dtype == 1  # DT_FLOAT
    assert [d.size for d in images.tensor_shape.dim] == [-1, 32, 32, 3]
    image_bytes = sigs["serving_bytes"].inputs["image_bytes"]
    assert image_bytes.dtype == 7  # DT_STRING
    assert [d.size for d in image_bytes.tensor_shape.dim] == [-1]
    for name in ("serving_default", "serving_bytes"):
        assert list(sigs[name].inputs) == (["images"] if name == "serving_default" else ["image_bytes"])
        assert sigs[name].method_name == "tensorflow/serving/predict"
        outputs = sigs[name].outputs
        assert set(outputs) == {"probabilities", "classes", "ood_score", "abstain"}
        assert outputs["probabilities"].dtype == 1 and outputs["classes"].dtype == 7
        for key in ("probabilities", "classes"):
            assert [d.size for d in outputs[key].tensor_shape.dim] == [-1, num_classes]
        assert outputs["ood_score"].dtype == 1 and outputs["abstain"].dtype == 10  # DT_FLOAT, DT_BOOL
        for key in ("ood_score", "abstain"):
            assert [d.size for d in outputs[key].tensor_shape.dim] == [-1]


def test_serving_default_matches_keras_model_to_1e_5(session, keras_model, exported_model, reference_pixels):
    from trainer.export.calibration import apply_temperature, as_logits
    from trainer.export.model_card import read_model_card

    out = session.run("serving_default", {"images": reference_pixels})
    # Served probabilities are the model's, calibrated by the temperature the export fitted.
    temperature = read_model_card(exported_model.path)["calibration"]["temperature"]
    expected = apply_temperature(as_logits(keras_model.predict(reference_pixels, verbose=0)), temperature)
    assert out["probabilities"].dtype == np.float32
    assert out["probabilities"].shape == expected.shape
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    # Class names tiled per row, aligned with the probability columns.
    assert out["classes"].shape == expected.shape
    for row in out["classes"]:
        assert [c.decode() for c in row] == list(exported_model.class_names)


def test_serving_bytes_on_exact_size_png_equals_serving_default(session, reference_pixels):
    """A 32x32 PNG is lossless and needs no resize: both signatures must see identical pixels."""
    encoded = []
    for img in reference_pixels.astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    from_bytes = session.run("serving_bytes", {"image_bytes": np.array(encoded, dtype=object)})
    from_pixels = session.run("serving_default", {"images": reference_pixels})
    np.testing.assert_allclose(from_bytes["probabilities"], from_pixels["probabilities"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(from_bytes["classes"], from_pixels["classes"])


def test_serving_bytes_accepts_gif_and_bmp_and_grayscale(session):
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    encoded = []
    for fmt, image in (("GIF", Image.fromarray(pixels)), ("BMP", Image.fromarray(pixels)),
                       ("PNG", Image.fromarray(pixels[..., 0]))):  # fmt: skip
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        encoded.append(buffer.getvalue())
    out = session.run("serving_bytes", {"image_bytes": np.array(encoded, dtype=object)})
    assert out["probabilities"].shape[0] == 3
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)


def test_serving_bytes_rejects_bytes_that_are_not_an_image(session):
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError):
        session.run("serving_bytes", {"image_bytes": np.array([b"definitely not an image"], dtype=object)})


def test_session_helper_names_the_problem_for_bad_requests(session):
    with pytest.raises(SignatureError, match="available"):
        session.run("no_such_signature", {})
    with pytest.raises(SignatureError, match="missing"):
        session.run("serving_default", {"pixels": np.zeros((1, 32, 32, 3), np.float32)})


def test_saved_model_cli_lists_both_signatures_with_shapes_and_dtypes(exported_model):
    cli = Path(sys.executable).with_name("saved_model_cli")
    result = subprocess.run(
        [str(cli), "show", "--all", "--dir", str(exported_model.path)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = result.stdout
    num_classes = len(exported_model.class_names)

    def block(signature: str) -> str:
        start = text.index(f"signature_def['{signature}']")
        end = text.find("signature_def[", start + 1)
        return text[start : end if end != -1 else len(text)]

    default = block("serving_default")
    assert "inputs['images'] tensor_info:" in default
    assert "dtype: DT_FLOAT" in default and "shape: (-1, 32, 32, 3)" in default
    encoded = block("serving_bytes")
    assert "inputs['image_bytes'] tensor_info:" in encoded
    assert "dtype: DT_STRING" in encoded and "shape: (-1)" in encoded
    for sig in (default, encoded):
        assert "outputs['probabilities'] tensor_info:" in sig
        assert "outputs['classes'] tensor_info:" in sig
        assert sig.count(f"shape: (-1, {num_classes})") == 2
        assert "Method name is: tensorflow/serving/predict" in sig


def test_session_runs_concurrently_from_many_threads(session, reference_pixels):
    """The gRPC test double calls `run` from its server threads; results must not mix between calls."""
    from concurrent.futures import ThreadPoolExecutor

    expected = [session.run("serving_default", {"images": reference_pixels[i : i + 1]}) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [
            pool.submit(session.run, "serving_default", {"images": reference_pixels[i % 8 : i % 8 + 1]})
            for i in range(64)
        ]
        results = [f.result(timeout=60) for f in futures]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["probabilities"], expected[i % 8]["probabilities"])


def test_verification_rejects_an_export_that_does_not_reproduce_the_model(exported_model, tmp_path):
    """publish() runs verify_export before the rename; a SavedModel from other weights must fail it."""
    import keras

    from tests.fixtures.exported import write_tiny_run_dir
    from trainer.export.savedmodel import ExportVerificationError, verify_export

    other = keras.saving.load_model(write_tiny_run_dir(tmp_path / "other", seed=7) / "model.keras")
    with pytest.raises(ExportVerificationError, match="differ from the Keras model"):
        verify_export(other, exported_model.class_names, exported_model.path)


def test_an_export_traces_the_decoding_graph_once_per_context_not_per_bytes_signature(
    keras_model, exported_model, tmp_path, monkeypatch
):
    """The decoding graph is the largest part of an export's tracing; serving_bytes and explain_bytes
    share one tf.function of it (savedmodel.shared_decoder). tf.saved_model.save traces again under
    its save context, so two traces per export; four when each signature decodes on its own."""
    import trainer.export.gradcam as gradcam
    import trainer.export.savedmodel as savedmodel
    from tests.tfserving_session import TFServingSession

    traces = []
    real = savedmodel.decode_and_resize_batch

    def counted(image_bytes):
        traces.append(image_bytes.graph)
        return real(image_bytes)

    monkeypatch.setattr(savedmodel, "decode_and_resize_batch", counted)
    monkeypatch.setattr(gradcam, "decode_and_resize_batch", counted)  # where explain_bytes would import it
    out = savedmodel.export_savedmodel(keras_model, exported_model.class_names, tmp_path / "1")
    assert len(traces) == 2
    with TFServingSession.load(out) as exported:  # both bytes signatures still decode
        assert {"serving_bytes", "explain_bytes"} <= set(exported.signature_defs)
