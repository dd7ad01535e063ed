"""The model registry honours the contract of docs/architecture.md for every architecture."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from trainer.models import LAST_CONV_LAYER, available_architectures, build_model
from trainer.models.augment import Cutout

MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)
AUGMENT = {"translate": 4, "flip": True, "rotation": 10.0, "brightness": 0.1, "cutout": 8}


def _images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype("float32")


def test_registry_lists_the_three_architectures() -> None:
    assert available_architectures() == ["bn_cnn", "plain_cnn", "resnet9"]
    with pytest.raises(ValueError, match="choose one of: bn_cnn, plain_cnn, resnet9"):
        build_model("vgg", num_classes=10, mean=MEAN, std=STD)


@pytest.mark.parametrize("arch", ["bn_cnn", "resnet9", "plain_cnn"])
def test_input_output_contract(arch: str) -> None:
    model = build_model(arch, num_classes=7, mean=MEAN, std=STD, augmentation=AUGMENT, width=4, dropout=0.2)
    assert model.name == arch
    assert tuple(model.input.shape) == (None, 32, 32, 3) and model.input.dtype == "float32"
    assert model.layers[1].name == "normalize"  # first layer after the input normalizes
    probs = np.asarray(model.predict(_images(), verbose=0))
    assert probs.shape == (4, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    feature_map = model.get_layer(LAST_CONV_LAYER).output
    assert len(feature_map.shape) == 4 and feature_map.shape[1] >= 2  # a spatial map for Grad-CAM


def test_normalization_layer_holds_the_given_statistics() -> None:
    model = build_model("bn_cnn", num_classes=10, mean=MEAN, std=STD, width=4)
    norm = model.get_layer("normalize")
    np.testing.assert_allclose(np.ravel(norm.mean), MEAN, rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.ravel(norm.variance)), STD, rtol=1e-6)
    # An image of exactly the mean colour normalizes to zero; mean + 1 std to one.
    probe = keras.Model(model.input, norm.output)
    pixels = np.stack([np.broadcast_to(MEAN, (32, 32, 3)), np.broadcast_to(np.add(MEAN, STD), (32, 32, 3))])
    out = np.asarray(probe.predict(pixels.astype("float32"), verbose=0))
    np.testing.assert_allclose(out[0], 0.0, atol=1e-5)
    np.testing.assert_allclose(out[1], 1.0, atol=1e-5)


def test_bad_statistics_are_rejected() -> None:
    with pytest.raises(ValueError, match="std must be > 0"):
        build_model("bn_cnn", num_classes=10, mean=MEAN, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3 values"):
        build_model("bn_cnn", num_classes=10, mean=(1.0, 2.0), std=STD)


@pytest.mark.parametrize("arch", ["bn_cnn", "resnet9"])
def test_augmentation_runs_in_training_only(arch: str) -> None:
    keras.utils.set_random_seed(1)
    model = build_model(arch, num_classes=10, mean=MEAN, std=STD, augmentation=AUGMENT, width=4, dropout=0.3)
    x = _images(8)
    a = np.asarray(model(x, training=False))
    b = np.asarray(model(x, training=False))
    np.testing.assert_array_equal(a, b)  # inference is deterministic: no augmentation, no dropout
    # The augmentation layers do change what the network sees in training.
    aug_out = model.get_layer("aug_cutout").output
    probe = keras.Model(model.input, aug_out)
    trained_view = np.asarray(probe(x, training=True))
    inference_view = np.asarray(probe(x, training=False))
    assert not np.allclose(trained_view, inference_view)
    norm = keras.Model(model.input, model.get_layer("normalize").output)
    np.testing.assert_allclose(inference_view, np.asarray(norm(x)), atol=1e-6)


def test_augmentation_can_be_switched_off() -> None:
    model = build_model("bn_cnn", num_classes=10, mean=MEAN, std=STD, augmentation={"enabled": False})
    assert not [layer for layer in model.layers if layer.name.startswith("aug_")]


def test_cutout_zeroes_one_square_per_image_in_training() -> None:
    layer = Cutout(8, seed=3)
    x = np.ones((16, 32, 32, 3), dtype="float32")
    out = np.asarray(layer(x, training=True))
    zeroed = (out == 0).all(axis=-1).sum(axis=(1, 2))
    assert (zeroed > 0).all() and (zeroed <= 64).all()  # at most 8x8, clipped at the border
    assert (zeroed == 64).any()
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)


def test_output_is_float32_under_mixed_precision() -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("bn_cnn", num_classes=10, mean=MEAN, std=STD, augmentation=AUGMENT, width=4)
        assert model.get_layer("s0a_conv").compute_dtype == "float16"
        assert model.output.dtype == "float32"
        probs = np.asarray(model.predict(_images(), verbose=0))
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_saved_model_reloads_with_its_custom_layers(tmp_path: Path) -> None:
    model = build_model("bn_cnn", num_classes=10, mean=MEAN, std=STD, augmentation=AUGMENT, width=4)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    x = _images()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert loaded.get_layer("aug_cutout").size == 8
