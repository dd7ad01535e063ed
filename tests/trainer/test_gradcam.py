"""Grad-CAM in the exported graph: the explain signatures run through the TF Serving session loader,
agree with serving_default, reject bad class indices, and point at the shape on trained synthetic data."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.tfserving_session import TFServingSession

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def session(exported_session):
    return exported_session


@pytest.fixture(scope="module")
def synthetic_test_split(exported_model):
    """The run's test images with the masks of where each image's class signal sits."""
    from trainer.data.synthetic import generate

    described = json.loads((exported_model.run_dir / "dataset.json").read_text())
    assert described["synthetic"], "the Grad-CAM localisation test needs the synthetic shapes dataset"
    x, y, masks = generate(described["num_test"], described["notes"]["test_seed"], return_masks=True)
    return x.astype(np.float32), y, masks


def _top_explain(session: TFServingSession, pixels: np.ndarray) -> dict[str, np.ndarray]:
    return session.run("explain", {"images": pixels, "class_index": np.full(len(pixels), -1, np.int32)})


def test_explain_signature_defs_have_the_documented_keys_dtypes_and_shapes(session, exported_model):
    num_classes = len(exported_model.class_names)
    sigs = session.signature_defs
    assert {"explain", "explain_bytes"} <= set(sigs)
    assert set(sigs["explain"].inputs) == {"images", "class_index"}
    assert set(sigs["explain_bytes"].inputs) == {"image_bytes", "class_index"}
    assert [d.size for d in sigs["explain"].inputs["images"].tensor_shape.dim] == [-1, 32, 32, 3]
    for name in ("explain", "explain_bytes"):
        assert sigs[name].method_name == "tensorflow/serving/predict"
        assert sigs[name].inputs["class_index"].dtype == 3  # DT_INT32
        outputs = sigs[name].outputs
        # ood_score and abstain as serving_default's (trainer/export/trust.py).
        keys = {"probabilities", "classes", "heatmap", "explained_class", "ood_score", "abstain"}
        assert set(outputs) == keys
        assert outputs["heatmap"].dtype == 1  # DT_FLOAT
        assert [d.size for d in outputs["heatmap"].tensor_shape.dim] == [-1, 32, 32]
        assert [d.size for d in outputs["probabilities"].tensor_shape.dim] == [-1, num_classes]
        assert outputs["explained_class"].dtype == 3


def test_explain_agrees_with_serving_default_and_heatmaps_are_normalized(session, reference_pixels):
    out = _top_explain(session, reference_pixels)
    predicted = session.run("serving_default", {"images": reference_pixels})["probabilities"]
    np.testing.assert_allclose(out["probabilities"], predicted, atol=1e-5)
    np.testing.assert_array_equal(out["explained_class"], predicted.argmax(axis=1))
    heatmap = out["heatmap"]
    assert heatmap.shape == (len(reference_pixels), 32, 32) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    peaks = heatmap.max(axis=(1, 2))
    # Each map is scaled to peak 1, unless nothing at all supports the class (all zeros).
    assert np.all(np.isclose(peaks, 1.0, atol=1e-5) | (peaks == 0.0))
    assert np.isclose(peaks, 1.0, atol=1e-5).any(), "every heatmap is empty"


def test_explicit_class_index_is_explained_and_changes_the_map(session, synthetic_test_split):
    pixels = synthetic_test_split[0][:6]
    top = _top_explain(session, pixels)
    other = (top["explained_class"] + 1) % top["probabilities"].shape[1]
    out = session.run("explain", {"images": pixels, "class_index": other.astype(np.int32)})
    np.testing.assert_array_equal(out["explained_class"], other)
    np.testing.assert_allclose(out["probabilities"], top["probabilities"], atol=1e-6)
    # Grad-CAM is class-discriminative: another class's evidence lies elsewhere (or nowhere).
    assert not np.allclose(out["heatmap"], top["heatmap"], atol=1e-3)


def test_explain_bytes_decodes_like_the_pixel_signature(session, synthetic_test_split):
    pixels = synthetic_test_split[0][:3]
    encoded = []
    for image in pixels.astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")  # lossless, 32x32: decodes to the same pixels
        encoded.append(buffer.getvalue())
    class_index = np.array([-1, 0, 3], np.int32)
    from_bytes = session.run(
        "explain_bytes", {"image_bytes": np.array(encoded, dtype=object), "class_index": class_index}
    )
    from_pixels = session.run("explain", {"images": pixels, "class_index": class_index})
    np.testing.assert_allclose(from_bytes["heatmap"], from_pixels["heatmap"], atol=1e-5)
    np.testing.assert_array_equal(from_bytes["explained_class"], from_pixels["explained_class"])


@pytest.mark.parametrize(
    ("class_index", "message"),
    [
        ([10, 0], "below the number of classes"),
        ([-2, 0], "-1 (top class) or a class index >= 0"),
        ([0], "one entry per image"),
    ],
)
def test_bad_class_index_is_refused_with_a_message_naming_the_fix(
    session, reference_pixels, class_index, message
):
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
        session.run(
            "explain", {"images": reference_pixels[:2], "class_index": np.array(class_index, np.int32)}
        )


def test_heatmap_concentrates_on_the_shape_that_carries_the_class(session, synthetic_test_split):
    x, y, masks = synthetic_test_split
    out = _top_explain(session, x)
    correct = out["explained_class"] == y
    assert correct.sum() >= 50, (
        f"only {correct.sum()} correctly classified test images: model too weak to judge"
    )
    heat, inside = out["heatmap"][correct], masks[correct]
    mean_in = np.array([h[m].mean() for h, m in zip(heat, inside, strict=True)])
    mean_out = np.array([h[~m].mean() if (~m).any() else 0.0 for h, m in zip(heat, inside, strict=True)])
    share_focused = float(np.mean(mean_in > mean_out))
    # The share of heat mass inside the box beats the box's share of the image on average: the
    # maps are not uniform blobs that happen to overlap a big box.
    mass_in = np.array([h[m].sum() / max(h.sum(), 1e-9) for h, m in zip(heat, inside, strict=True)])
    area_in = inside.mean(axis=(1, 2))
    print(f"focused {share_focused:.2f}, mass inside {mass_in.mean():.2f} vs area {area_in.mean():.2f}")
    assert share_focused >= 0.75, (
        f"heatmap brighter inside the shape box for only {share_focused:.0%} of images"
    )
    assert mass_in.mean() > area_in.mean() + 0.1


def test_every_architecture_names_its_last_conv_block_for_gradcam():
    from trainer.export.gradcam import LAST_CONV_LAYER, find_last_conv_layer
    from trainer.models import LAST_CONV_LAYER as MODELS_LAST_CONV
    from trainer.models import build_model, gradcam_architectures

    assert LAST_CONV_LAYER == MODELS_LAST_CONV
    for arch in gradcam_architectures():  # every architecture with a convolution
        model = build_model(arch, num_classes=3, mean=[120.0] * 3, std=[60.0] * 3, width=4)
        layer = find_last_conv_layer(model)
        assert layer is not None and layer.name == LAST_CONV_LAYER, arch
        assert len(layer.output.shape) == 4


def test_a_model_without_spatial_layers_still_exports_without_explain(tmp_path):
    import keras

    from trainer.export.savedmodel import export_savedmodel

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Flatten()(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Rescaling(1 / 255.0)(x))
    path = export_savedmodel(keras.Model(inputs, outputs), ["a", "b"], tmp_path / "sm")
    with TFServingSession.load(path) as loaded:
        assert {"serving_default", "serving_bytes"} <= set(loaded.signature_defs)
        assert not {"explain", "explain_bytes"} & set(loaded.signature_defs)


def test_publish_verification_checks_the_explain_signature(exported_model, reference_pixels):
    from trainer.export.gradcam import verify_explain

    loaded = tf.saved_model.load(str(exported_model.path))
    expected = loaded.signatures["serving_default"](images=tf.constant(reference_pixels))[
        "probabilities"
    ].numpy()
    assert verify_explain(loaded, tf.constant(reference_pixels), expected, 1e-5) is None
    wrong = np.roll(expected, 1, axis=1)  # what a graph traced from the wrong model state would give
    problem = verify_explain(loaded, tf.constant(reference_pixels), wrong, 1e-5)
    assert problem is not None and "explain probabilities differ" in problem


def test_gradients_reproduce_cam_for_a_global_average_pooled_linear_head(
    session, exported_model, reference_pixels
):
    """bn_cnn ends last_conv -> global average pool -> dense logits, for which Grad-CAM is provably
    CAM (Zhou et al. 2016): dy_c/dA_k = W[k, c] / (h*w) everywhere, so the map is ReLU(sum_k W[k,c] A_k)
    up to scale. Computing that from the activations and the logits kernel, with no gradients, checks
    the graph's GradientTape part independently."""
    import keras

    import trainer.models  # noqa: F401  (custom layers)

    model = keras.saving.load_model(exported_model.run_dir / "model.keras", compile=False)
    assert isinstance(model.get_layer("global_pool"), keras.layers.GlobalAveragePooling2D)
    activations = keras.Model(model.inputs, model.get_layer("last_conv").output).predict(
        reference_pixels, verbose=0
    )
    kernel = np.asarray(model.get_layer("logits").kernel)
    out = _top_explain(session, reference_pixels)
    cam = np.maximum(np.einsum("nhwk,kn->nhw", activations, kernel[:, out["explained_class"]]), 0.0)
    cam = tf.image.resize(cam[..., None], [32, 32], method="bilinear").numpy()[..., 0]
    peak = cam.max(axis=(1, 2), keepdims=True)
    expected = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    np.testing.assert_allclose(out["heatmap"], expected, atol=1e-4)


def test_a_model_without_convolutions_has_nothing_to_explain() -> None:
    from trainer.export.gradcam import find_last_conv_layer
    from trainer.models import build_model

    # mlp's only 4-D layers are the normalize/augment stem: a "heatmap" there would be meaningless.
    mlp = build_model("mlp", num_classes=10, mean=[120.0] * 3, std=[60.0] * 3, width=16,
                      augmentation={"translate": 2, "cutout": 4, "flip": True})
    assert find_last_conv_layer(mlp) is None
    nin = build_model("nin", num_classes=10, mean=[120.0] * 3, std=[60.0] * 3, width=8)
    assert find_last_conv_layer(nin).name == "last_conv"
