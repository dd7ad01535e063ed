"""Upload decoding: every Pillow mode becomes RGB, bad files get clear errors, bombs are not decoded."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.errors import GatewayError
from serving.images import decode_image

LIMIT = 1_000_000


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but which carries no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def sixteen_bit_gray_png(width: int, height: int) -> bytes:
    """A valid 16-bit grayscale PNG of width x height, all black: a few bytes per row compressed,
    so a 6324x6324 one is about 80 KiB and decodes to 80 MB (the bomb of issue 13)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + 2 * width)  # filter byte 0, then zero samples
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def decode(data: bytes) -> Image.Image:
    return decode_image(data, filename="upload.png", max_pixels=LIMIT)


def error_of(data: bytes, max_pixels: int = LIMIT) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        decode_image(data, filename="upload.bin", max_pixels=max_pixels)
    assert "upload.bin" in info.value.message  # the client learns which file failed
    return info.value


def test_rgb_png_round_trips() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = decode(encode(Image.fromarray(pixels), "PNG"))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), pixels)


def test_grayscale_becomes_three_equal_channels() -> None:
    out = np.asarray(decode(encode(Image.new("L", (8, 8), 77), "PNG")))
    assert out.shape == (8, 8, 3) and (out == 77).all()


def test_palette_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    out = decode(encode(image, "PNG", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent index -> white, not black
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_rgba_is_composited_on_white() -> None:
    image = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    out = decode(encode(image, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 255)


def test_cmyk_jpeg_becomes_rgb() -> None:
    out = decode(encode(Image.new("RGB", (16, 16), (200, 40, 40)).convert("CMYK"), "JPEG", quality=95))
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r > 150 and g < 90 and b < 90


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    assert image.mode == "I;16"
    out = decode(encode(image, "PNG"))
    assert out.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257, where convert() would give 255


def test_animation_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    r, g, b = decode(buffer.getvalue()).getpixel((4, 4))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode(encode(image, "JPEG", exif=exif, quality=95))
    assert out.size == (20, 40)  # portrait once rotated
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and bottom[2] > 200  # the left (red) half is now on top


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_then_turned_upright() -> None:
    """A phone photo (here 2048x1536, Orientation 6) decodes at 1/8: 256x192, turned to 192x256."""
    image = Image.new("RGB", (2048, 1536), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 1024, 1536))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(image, "JPEG", exif=exif, quality=90), filename="phone.jpg", max_pixels=10**7)
    assert out.size == (192, 256)
    top, bottom = out.getpixel((96, 20)), out.getpixel((96, 236))
    assert top[0] > 200 and bottom[2] > 200


def test_a_large_cmyk_jpeg_is_decoded_reduced_to_rgb() -> None:
    image = Image.new("RGB", (1024, 1024), (200, 40, 40)).convert("CMYK")
    out = decode_image(encode(image, "JPEG", quality=95), filename="print.jpg", max_pixels=10**7)
    r, g, b = out.getpixel((64, 64))
    assert out.size == (128, 128) and out.mode == "RGB" and r > 150 and g < 90 and b < 90


def test_a_truncated_large_jpeg_is_400_too() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG")
    error = error_of(data[: len(data) // 2], max_pixels=10**7)
    assert (error.status, error.code) == (400, "truncated_image")


# EXIF blocks Pillow cannot parse: with a JFIF density header (dpi) Pillow reads the EXIF while
# loading and raised ValueError ("not a TIFF file") or struct.error (a BigTIFF-style header).
GARBLED_EXIF = {
    "garbage": b"Exif\x00\x00" + b"\x13\x37" * 20,
    "bigtiff header": b"Exif\x00\x00II\x2b\x00\x08\x00\x00\x00" + b"\x00" * 16,
    "truncated ifd": b"Exif\x00\x00II\x2a\x00\x08\x00\x00\x00\x05\x00\x12\x01",
}


@pytest.mark.parametrize("exif", sorted(GARBLED_EXIF))
@pytest.mark.parametrize("dpi", [None, (72, 72)])
def test_a_garbled_exif_block_does_not_cost_a_decodable_photo(exif: str, dpi: tuple | None) -> None:
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    params = {"quality": 95, **({"dpi": dpi} if dpi else {})}
    plain = decode(encode(image, "JPEG", **params))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode(encode(image, "JPEG", exif=GARBLED_EXIF[exif], **params))
    # As decoded, unrotated: what the exported bytes signature does with an unreadable block.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    # Handled, so not reported: Pillow's "Corrupt EXIF data" warning stays out of the server's stderr.
    assert not [str(w.message) for w in caught if "EXIF" in str(w.message)]


def test_empty_file() -> None:
    error = error_of(b"")
    assert (error.status, error.code) == (400, "empty_file")


def test_not_an_image() -> None:
    error = error_of(b"this is a text file, not a picture\n" * 10)
    assert (error.status, error.code) == (400, "not_an_image")


def test_unsupported_format_is_415() -> None:
    # PCX: Pillow reads it, but it is no photo format and its decoder is not one we vouch for.
    error = error_of(encode(Image.new("RGB", (8, 8)), "PCX"))
    assert (error.status, error.code) == (415, "unsupported_format")
    assert "JPEG" in error.message and "WebP" in error.message  # names what to convert to


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), fmt)
    error = error_of(data[: len(data) // 2])
    assert (error.status, error.code) == (400, "truncated_image")


@pytest.mark.parametrize("size", [(100_000, 100_000), (1001, 1000)])
def test_decompression_bomb_is_refused_before_decoding(size: tuple[int, int]) -> None:
    # The file has no pixel data: decoding it would fail as truncated, so the 413 proves the
    # refusal came from the declared size alone. (100000^2 is also past Pillow's own bomb guard.)
    start = time.perf_counter()
    error = error_of(png_header_only(*size))
    assert (error.status, error.code) == (413, "image_too_many_pixels")
    assert time.perf_counter() - start < 0.5
    if size[0] == 1001:
        assert "1001x1000" in error.message and str(LIMIT) in error.message


def test_image_at_the_pixel_limit_is_accepted() -> None:
    out = decode_image(encode(Image.new("RGB", (1000, 1000)), "PNG"), filename="x", max_pixels=LIMIT)
    assert out.size == (1000, 1000)


def test_a_side_over_65535_pixels_is_413_and_65535_is_accepted() -> None:
    from contract.signatures import MAX_SIDE

    assert decode(encode(Image.new("RGB", (MAX_SIDE, 1)), "BMP")).size == (MAX_SIDE, 1)
    error = error_of(encode(Image.new("RGB", (1, MAX_SIDE + 1)), "BMP"))
    assert (error.status, error.code) == (413, "image_side_too_long") and "65535" in error.message


# -- memory-lean decoding (serving/images.py to_rgb_banded) -------------------------------------


def _tall(mode: str) -> Image.Image:
    """A tall image of `mode` with varied values, more rows than one conversion band holds."""
    from serving.images import BAND_PIXELS

    width, height = 40, BAND_PIXELS // 40 * 2 + 7  # two full bands and a partial one
    rng = np.random.default_rng(3)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5, 70000, (height, width), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-3, 300, (height, width)).astype(np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        image = rgba.convert("RGB").quantize(64)
        image.info["transparency"] = 5
        return image
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGBA", "LA", "P", "CMYK", "L", "1", "YCbCr"])
def test_banded_conversion_gives_the_pixels_of_the_whole_image_conversion(mode: str) -> None:
    from contract.preprocess import to_rgb
    from serving.images import to_rgb_banded

    image = _tall(mode)
    assert image.mode == mode
    banded = to_rgb_banded(image)
    assert banded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(banded), np.asarray(to_rgb(image)))


def test_a_16_bit_png_decodes_without_whole_image_temporaries() -> None:
    import tracemalloc

    # 3000x3000 16-bit gray: the whole-image conversion (float64 copies) would allocate over 200 MB
    # through NumPy; in bands it stays a few MiB (Pillow's own buffers are not traced, NumPy's are).
    rows = np.tile(np.linspace(0, 65535, 3000).astype(np.uint16), (3000, 1))
    data = encode(Image.fromarray(rows), "PNG")
    tracemalloc.start()
    try:
        out = decode_image(data, filename="deep.png", max_pixels=10**7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.size == (3000, 3000) and out.getpixel((2999, 0)) == (255, 255, 255)
    assert peak < 48 * 2**20, f"peak {peak / 2**20:.0f} MiB of NumPy temporaries"
