"""Upload pixels -> model input: the contract's size, RGB from any mode, Pillow's bilinear resize, and
large JPEGs decoded at a reduced scale."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from contract.preprocess import (
    DECODE_MIN_SIDE,
    RESAMPLE,
    decode_reduced,
    decode_to_model_input,
    jpeg_decode_scale,
    to_model_input,
    to_rgb,
    upright,
)
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


@pytest.mark.parametrize(
    ("size", "scale"),
    [
        ((100, 90), 1),
        ((255, 4000), 1),  # the short side decides: halving it would leave 127
        ((256, 256), 2),
        ((511, 600), 2),
        ((512, 512), 4),
        ((1023, 1025), 4),
        ((1024, 1024), 8),
        ((4032, 3024), 8),  # a 12 Mpx phone photo: never more than 1/8, all libjpeg offers
    ],
)
def test_jpeg_decode_scale_keeps_both_sides_at_least_the_minimum(size: tuple[int, int], scale: int) -> None:
    assert DECODE_MIN_SIDE == 4 * INPUT_SIZE
    assert jpeg_decode_scale(*size) == scale
    assert min(size) // scale >= DECODE_MIN_SIDE or scale == 1


def _jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rng = np.random.default_rng(seed)
    pixels = np.stack([x * 255 // size[0], y * 255 // size[1], (x + y) % 256], axis=-1)
    pixels = np.clip(pixels + rng.integers(-10, 11, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(4032, 3024), (1023, 1025), (511, 600), (200, 150)])
def test_a_large_jpeg_decodes_at_the_reduced_scale(size: tuple[int, int]) -> None:
    scale = jpeg_decode_scale(*size)
    image = decode_reduced(Image.open(io.BytesIO(_jpeg(size))))
    image.load()
    assert image.size == (-(-size[0] // scale), -(-size[1] // scale))  # each side rounded up


def test_other_formats_decode_whole() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (2048, 1536), (1, 2, 3)).save(buffer, format="PNG")
    image = decode_reduced(Image.open(buffer))
    image.load()
    assert image.size == (2048, 1536)


def test_reduced_decoding_moves_the_models_pixels_by_at_most_a_level_or_two() -> None:
    """What the model sees from a reduced decode is the full decode's resize within a level or two (on
    CIFAR-10 photos upscaled to 256-4032 px and saved as JPEG: at most 2, `make bench-decode`)."""
    for size in [(4032, 3024), (1280, 960), (256, 256)]:
        data = _jpeg(size, seed=size[0])
        whole = Image.open(io.BytesIO(data))
        whole.load()
        reduced = decode_to_model_input(Image.open(io.BytesIO(data))).astype(int)
        difference = np.abs(reduced - to_model_input(whole).astype(int))
        assert difference.max() <= 2, (size, difference.max())
