"""Upload pixels -> model input: the contract's size, RGB from any mode, and Pillow's bilinear resize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from contract.preprocess import RESAMPLE, to_model_input, to_rgb, upright
from contract.signatures import CHANNELS, INPUT_SIZE


@pytest.mark.parametrize("size", [(1, 1), (32, 32), (97, 75), (640, 20)])
def test_any_size_becomes_the_models_input_shape(size: tuple[int, int]) -> None:
    pixels = to_model_input(Image.new("RGB", size, (10, 20, 30)))
    assert pixels.shape == (INPUT_SIZE, INPUT_SIZE, CHANNELS) and pixels.dtype == np.uint8
    assert (pixels == (10, 20, 30)).all()


def test_the_resize_is_pillows_bilinear() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (75, 97, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    expected = np.asarray(image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR))
    assert RESAMPLE == Image.Resampling.BILINEAR
    np.testing.assert_array_equal(to_model_input(image), expected)


def test_an_image_already_at_input_size_is_passed_through() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_model_input(Image.fromarray(noise)), noise)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("RGBA", (2, 2), (0, 0, 255, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("LA", (2, 2), (0, 255)), (0, 0, 0)),  # opaque black stays black
        (Image.fromarray(np.full((2, 2), 40000, dtype=np.uint16)), (156, 156, 156)),  # 16-bit scaled
    ],
)
def test_to_rgb_from_other_modes(image: Image.Image, expected: tuple[int, int, int]) -> None:
    out = to_rgb(image)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == expected


def test_upright_applies_exif_orientation() -> None:
    image = Image.new("RGB", (40, 20))
    image.getexif()[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert upright(image).size == (20, 40)
    assert upright(Image.new("RGB", (40, 20))).size == (40, 20)  # no EXIF: unchanged
