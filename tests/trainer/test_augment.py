"""The augmentation layers draw the anchor's distributions (Page's cifar10-fast), not look-alikes.

Shifts: pad 4 with reflect then a random 32x32 crop, so dy and dx are integers uniform over -4..4
(a rounded continuous shift would give +-4 half as often). Flip: a fair coin per image. Cutout: the
square always lies wholly inside the image, its corner uniform. At inference every layer is the
identity.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from trainer.models.augment import Cutout, HorizontalFlip, RandomShift, augmentation_layers

N = 4000  # images per histogram: 5 standard deviations of a bin's frequency is ~0.025 at p=1/9
SIDE = 32


def _coordinate_images(n: int, seed: int = 0) -> np.ndarray:
    """Channel 0 = row index, channel 1 = column index, channel 2 = noise: positions are readable."""
    rows, cols = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    x = np.empty((n, SIDE, SIDE, 3), dtype="float32")
    x[..., 0], x[..., 1] = rows, cols
    x[..., 2] = np.random.default_rng(seed).normal(size=(n, SIDE, SIDE))
    return x


def _assert_uniform(values: np.ndarray, support: range, what: str) -> None:
    counts = np.array([(values == v).sum() for v in support])
    assert counts.sum() == len(values), f"{what}: values outside {support}"
    freq = counts / len(values)
    p = 1.0 / len(support)
    tolerance = 5 * np.sqrt(p * (1 - p) / len(values))
    assert np.all(np.abs(freq - p) < tolerance), f"{what}: frequencies {np.round(freq, 3)} vs {p:.3f}"


def test_shifts_are_whole_pixels_uniform_over_minus_t_to_t_on_each_axis() -> None:
    t = 4
    x = _coordinate_images(N)
    out = np.asarray(RandomShift(t, seed=0)(x, training=True))
    # The centre pixel is never reflected for |shift| <= 4, so it reads the source position.
    dy = out[:, 16, 16, 0] - 16
    dx = out[:, 16, 16, 1] - 16
    np.testing.assert_array_equal(dy, np.round(dy))
    _assert_uniform(dy, range(-t, t + 1), "dy")
    _assert_uniform(dx, range(-t, t + 1), "dx")
    # Drawn independently per axis, not one shared offset.
    assert np.mean(dy == dx) < 0.2


def test_a_shift_is_the_reflect_padded_random_crop() -> None:
    t = 4
    x = _coordinate_images(64, seed=1)
    out = np.asarray(RandomShift(t, seed=2)(x, training=True))
    padded = np.pad(x, [(0, 0), (t, t), (t, t), (0, 0)], mode="reflect")
    for i in range(len(x)):
        top = int(out[i, 16, 16, 0]) - 16 + t
        left = int(out[i, 16, 16, 1]) - 16 + t
        np.testing.assert_array_equal(out[i], padded[i, top : top + SIDE, left : left + SIDE])


def test_flip_mirrors_about_half_the_images_horizontally() -> None:
    x = _coordinate_images(N)
    out = np.asarray(HorizontalFlip(seed=0)(x, training=True))
    flipped = out[:, 0, 0, 1] == SIDE - 1
    assert np.all(flipped | (out[:, 0, 0, 1] == 0))
    _assert_uniform(flipped.astype(int), range(2), "flip")
    np.testing.assert_array_equal(out[flipped], x[flipped][:, :, ::-1])
    np.testing.assert_array_equal(out[~flipped], x[~flipped])


@pytest.mark.parametrize("size", [8, 12])
def test_cutout_square_is_always_wholly_inside_and_its_corner_uniform(size: int) -> None:
    x = np.ones((N, SIDE, SIDE, 3), dtype="float32")
    out = np.asarray(Cutout(size, seed=0)(x, training=True))
    zero = (out == 0).all(axis=-1)
    assert ((out == 0) == zero[..., None]).all()  # all channels of a pixel together
    np.testing.assert_array_equal(zero.sum(axis=(1, 2)), size * size)
    top = zero.any(axis=2).argmax(axis=1)
    left = zero.any(axis=1).argmax(axis=1)
    # size*size zeroed pixels whose bounding box is size x size: exactly one square.
    for i in range(100):
        assert zero[i, top[i] : top[i] + size, left[i] : left[i] + size].all()
    _assert_uniform(top, range(SIDE - size + 1), "top")
    _assert_uniform(left, range(SIDE - size + 1), "left")


def test_cutout_larger_than_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match="lower augment.cutout"):
        Cutout(40)(np.ones((1, SIDE, SIDE, 3), dtype="float32"), training=True)


@pytest.mark.parametrize(
    "layer", [RandomShift(4), HorizontalFlip(), Cutout(8)], ids=lambda layer: type(layer).__name__
)
def test_every_layer_is_the_identity_at_inference(layer: keras.layers.Layer) -> None:
    x = _coordinate_images(8)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    np.testing.assert_array_equal(np.asarray(layer(x)), x)


def test_a_seed_fixes_the_draws_and_each_call_draws_anew() -> None:
    x = _coordinate_images(32)
    a, b = RandomShift(4, seed=7), RandomShift(4, seed=7)
    first = np.asarray(a(x, training=True))
    np.testing.assert_array_equal(first, np.asarray(b(x, training=True)))
    assert not np.array_equal(first, np.asarray(a(x, training=True)))


def test_layers_round_trip_through_keras_serialization() -> None:
    for layer in augmentation_layers(translate=3, flip=True, cutout=6, seed=5):
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        assert type(restored) is type(layer) and restored.get_config() == layer.get_config()


def test_augmentation_layers_use_the_xla_friendly_layers() -> None:
    names = {layer.name: type(layer) for layer in augmentation_layers(translate=4, flip=True, cutout=8)}
    assert names == {"aug_flip": HorizontalFlip, "aug_translate": RandomShift, "aug_cutout": Cutout}
    assert all(layer.supports_jit for layer in augmentation_layers(translate=4, cutout=8, brightness=0.1))
    rotate = augmentation_layers(translate=0, flip=False, rotation=10.0)
    # Keras' RandomRotation cannot be XLA-compiled: it is off in every shipped profile.
    assert [(layer.name, layer.supports_jit) for layer in rotate] == [("aug_rotate", False)]
