"""The model registry honours the contract of docs/architecture.md for every architecture."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from trainer.models import LAST_CONV_LAYER, available_architectures, build_model, gradcam_architectures
from trainer.models.augment import Cutout

MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)
AUGMENT = {"translate": 4, "flip": True, "rotation": 10.0, "brightness": 0.1, "cutout": 8}


def _images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)).astype("float32")


def test_registry_lists_the_architectures() -> None:
    assert available_architectures() == ["airbench", "bn_cnn", "mlp", "nin", "plain_cnn", "resnet9"]
    with pytest.raises(ValueError, match="choose one of: airbench, bn_cnn, mlp, nin, plain_cnn, resnet9"):
        build_model("vgg", num_classes=10, mean=MEAN, std=STD)
    # Only the MLP has no convolution, so no Grad-CAM.
    assert gradcam_architectures() == ["airbench", "bn_cnn", "nin", "plain_cnn", "resnet9"]


@pytest.mark.parametrize("arch", ["bn_cnn", "resnet9", "plain_cnn", "nin", "mlp", "airbench"])
def test_input_output_contract(arch: str) -> None:
    model = build_model(arch, num_classes=7, mean=MEAN, std=STD, augmentation=AUGMENT, width=4, dropout=0.2)
    assert model.name == arch
    assert tuple(model.input.shape) == (None, 32, 32, 3) and model.input.dtype == "float32"
    assert model.layers[1].name == "normalize"  # first layer after the input normalizes
    probs = np.asarray(model.predict(_images(), verbose=0))
    assert probs.shape == (4, 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    if arch not in gradcam_architectures():
        with pytest.raises(ValueError):
            model.get_layer(LAST_CONV_LAYER)
        return
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


def _kernels(model: keras.Model) -> dict[str, np.ndarray]:
    return {
        layer.name: np.asarray(layer.kernel)
        for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
    }


def _fan_in(kernel: np.ndarray) -> int:
    return int(np.prod(kernel.shape[:-1]))  # kh * kw * in_channels, or in_features


def test_torch_init_is_pytorchs_default_uniform_bound_by_one_over_sqrt_fan_in() -> None:
    # resnet9 defaults to it (Page trains with PyTorch's default init).
    kernels = _kernels(build_model("resnet9", num_classes=10, mean=MEAN, std=STD, width=8))
    assert {"prep_conv", "res3_b_conv", "logits"} <= set(kernels)
    for name, kernel in kernels.items():
        bound = 1.0 / np.sqrt(_fan_in(kernel))
        assert np.abs(kernel).max() <= bound, name
        assert np.abs(kernel).max() > 0.95 * bound, name  # reaches the bound: not a narrower law
    # The largest kernel (res3: 9 * 64 inputs, 64 outputs) is flat over [-bound, bound].
    kernel = kernels["res3_b_conv"]
    bound = 1.0 / np.sqrt(_fan_in(kernel))
    counts, _ = np.histogram(kernel, bins=10, range=(-bound, bound))
    expected = kernel.size / 10
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), counts
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05)


def test_torch_init_draws_biases_like_pytorch_too() -> None:
    model = build_model("plain_cnn", num_classes=10, mean=MEAN, std=STD, width=8, init="torch")
    for name in ("c1a", "fc", "logits"):
        layer = model.get_layer(name)
        bias, bound = np.asarray(layer.bias), 1.0 / np.sqrt(_fan_in(np.asarray(layer.kernel)))
        assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0, name


def test_he_normal_init_stays_the_default_of_the_other_architectures() -> None:
    for arch in ("bn_cnn", "plain_cnn", "nin", "mlp"):
        model = build_model(arch, num_classes=10, mean=MEAN, std=STD, width=16)
        kernels = _kernels(model)
        hidden = [k for name, k in kernels.items() if name != "logits" and k.size >= 2000]
        assert hidden, arch
        for kernel in hidden:
            # Keras' HeNormal: truncated normal whose std is sqrt(2 / fan_in); wider than torch's.
            np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / _fan_in(kernel)), rtol=0.1)
        bias = model.get_layer("logits").bias
        assert bias is not None and not np.asarray(bias).any()  # zero-initialized head bias


def test_resnet9_head_has_no_bias_like_page_and_both_defaults_can_be_overridden() -> None:
    resnet = build_model("resnet9", num_classes=10, mean=MEAN, std=STD, width=4)
    logits = resnet.get_layer("logits")
    assert logits.bias is None and not logits.use_bias
    assert [w.name for w in logits.weights] == ["kernel"]
    assert resnet.get_layer("logit_scale").scale == 0.125
    with_bias = build_model("resnet9", num_classes=10, mean=MEAN, std=STD, width=4, head_bias=True)
    assert with_bias.get_layer("logits").use_bias
    without = build_model("bn_cnn", num_classes=10, mean=MEAN, std=STD, width=4, head_bias=False)
    assert not without.get_layer("logits").use_bias
    he = build_model("resnet9", num_classes=10, mean=MEAN, std=STD, width=16, init="he_normal")
    kernel = np.asarray(he.get_layer("res3_b_conv").kernel)
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / _fan_in(kernel)), rtol=0.1)
    with pytest.raises(ValueError, match="unknown init 'xavier'; choose one of: he_normal, torch"):
        build_model("bn_cnn", num_classes=10, mean=MEAN, std=STD, init="xavier")


@pytest.mark.parametrize("arch", ["nin", "mlp"])
def test_new_architectures_train_save_and_reload(arch: str, tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    model = build_model(arch, num_classes=3, mean=MEAN, std=STD, augmentation=AUGMENT | {"rotation": 0.0},
                        width=8, dropout=0.1)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="sparse_categorical_crossentropy", jit_compile=False)
    x, y = _images(24, seed=3), np.arange(24) % 3
    before = [np.array(w) for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    after = model.trainable_weights
    assert any(not np.allclose(a, np.asarray(b)) for a, b in zip(before, after, strict=True))
    path = tmp_path / f"{arch}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
