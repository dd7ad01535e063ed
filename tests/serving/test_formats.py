"""Every photo format Pillow reads safely (issue 13 item 6): WebP, TIFF, MPO (a phone JPEG with an
MPF second image), AVIF, HEIC with the optional extra, beside JPEG/PNG/GIF/BMP; the web page's
accept list to match."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.images import SUPPORTED_FORMATS, decode_image

PROJECT = Path(__file__).resolve().parents[2]


def encode(image: Image.Image | list[Image.Image], fmt: str, **params: object) -> bytes:
    frames = image if isinstance(image, list) else [image]
    buffer = io.BytesIO()
    if len(frames) > 1:
        params = {"save_all": True, "append_images": frames[1:], **params}
    frames[0].save(buffer, fmt, **params)
    return buffer.getvalue()


def photo(seed: int = 0, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A smooth, photo-like RGB image (noise would make lossy codecs meaningless to compare)."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.02, 0.2, 3)
    waves = [np.sin(a * x), np.cos(b * y), np.sin(c * (x + y))]
    pixels = np.stack([127 + 120 * w for w in waves], -1)
    return Image.fromarray(pixels.astype(np.uint8))


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data, filename="upload", max_pixels=10**7), dtype=np.int16)


def has_heif() -> bool:
    return "HEIF" in SUPPORTED_FORMATS


NO_HEIF = "pillow-heif (the `heic` extra) is not installed"


LOSSLESS = {
    "WEBP": {"lossless": True},
    "TIFF": {},
    "TIFF-deflate": {"compression": "tiff_adobe_deflate"},
    "PNG": {},
    "BMP": {},
}


@pytest.mark.parametrize("kind", sorted(LOSSLESS))
def test_lossless_formats_decode_to_the_very_pixels(kind: str) -> None:
    image = photo(1)
    out = decoded(encode(image, kind.split("-")[0], **LOSSLESS[kind]))
    np.testing.assert_array_equal(out, np.asarray(image))


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [
        ("JPEG", {"quality": 95}, 6),
        ("WEBP", {"quality": 95}, 12),
        ("AVIF", {"quality": 95}, 12),
        pytest.param(
            "HEIF",
            {"quality": 95},
            12,
            marks=pytest.mark.skipif(not has_heif(), reason=NO_HEIF),
        ),
    ],
)
def test_lossy_formats_decode_close_to_the_original(fmt: str, params: dict, tolerance: int) -> None:
    image = photo(2)
    out = decoded(encode(image, fmt, **params))
    assert out.shape == (72, 96, 3)
    assert np.abs(out - np.asarray(image, dtype=np.int16)).mean() < tolerance


def test_a_phone_jpeg_with_an_mpf_second_image_gives_its_first_frame() -> None:
    first, second = photo(3), Image.new("RGB", (96, 72), (0, 0, 255))
    data = encode([first, second], "MPO", quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"  # what Pillow calls it: 415 before issue 13
    np.testing.assert_array_equal(decoded(data), decoded(encode(first, "JPEG", quality=95)))


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF", "GIF"])
def test_animations_and_multi_page_files_give_their_first_frame(fmt: str) -> None:
    red, blue = Image.new("RGB", (16, 16), (250, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 250))
    params = {"lossless": True} if fmt == "WEBP" else {}
    r, _, b = decoded(encode([red, blue], fmt, **params))[8, 8]
    assert r > 200 and b < 50


def test_a_16_bit_rgb_tiff_and_a_cmyk_tiff_become_8_bit_rgb() -> None:
    image = photo(4)
    out = decoded(encode(image.convert("CMYK"), "TIFF"))
    assert out.shape == (72, 96, 3)
    assert np.abs(out - np.asarray(image, dtype=np.int16)).max() <= 2  # CMYK round trip
    deep = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    gray = decoded(encode(deep, "TIFF"))
    np.testing.assert_array_equal(gray[..., 0], np.asarray(image.convert("L")))


# -- the web page ----------------------------------------------------------------------------------

MIME = {
    "JPEG": "image/jpeg",
    "MPO": ".mpo",
    "PNG": "image/png",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "AVIF": "image/avif",
}


def test_the_page_accept_list_names_every_supported_format() -> None:
    html = (PROJECT / "serving" / "static" / "index.html").read_text()
    accept = re.search(r'id="file-input"[^>]*accept="([^"]+)"', html, re.S)
    assert accept, "the file input has no accept list"
    accepted = set(accept.group(1).split(","))
    # HEIF is left out on purpose (iOS then converts HEIC photos to JPEG for the page).
    missing = [fmt for fmt in SUPPORTED_FORMATS if fmt != "HEIF" and MIME[fmt] not in accepted]
    assert not missing, f"index.html's accept list lacks {missing}"


# -- through the HTTP API, with real photos ------------------------------------------------------


@pytest.fixture(scope="module")
def real_photo(cifar_sample) -> Image.Image:
    """A real CIFAR-10 photo, upscaled to a phone-like aspect (skips without ../shared)."""
    path, _ = cifar_sample[0]
    return Image.open(path).convert("RGB").resize((160, 120), Image.Resampling.BICUBIC)


def predict(client, data: bytes, name: str) -> dict:
    response = client.post("/v1/predict", data={"images": [(io.BytesIO(data), name)]})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["predictions"][0]["probabilities"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fmt", "name", "params"),
    [
        ("WEBP", "photo.webp", {"lossless": True}),
        ("TIFF", "photo.tif", {"compression": "tiff_lzw"}),
        ("PNG", "photo.png", {}),
    ],
)
def test_lossless_photos_are_predicted_as_their_png(gateway_client, real_photo, fmt, name, params) -> None:
    reference = predict(gateway_client, encode(real_photo, "PNG"), "photo.png")
    assert predict(gateway_client, encode(real_photo, fmt, **params), name) == reference


@pytest.mark.slow
def test_an_mpo_photo_is_predicted_as_its_first_frame(gateway_client, real_photo) -> None:
    second = real_photo.transpose(Image.Transpose.ROTATE_180)  # a different picture
    mpo = encode([real_photo, second], "MPO", quality=92)
    first = predict(gateway_client, encode(real_photo, "JPEG", quality=92), "first.jpg")
    assert predict(gateway_client, mpo, "phone.jpg") == first


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt",
    [
        "AVIF",
        pytest.param(
            "HEIF", marks=pytest.mark.skipif(not has_heif(), reason=NO_HEIF)
        ),
    ],
)
def test_avif_and_heic_photos_are_predicted(gateway_client, real_photo, fmt) -> None:
    probabilities = predict(gateway_client, encode(real_photo, fmt, quality=90), f"photo.{fmt.lower()}")
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_an_unsupported_format_is_415_naming_the_formats(gateway_client) -> None:
    data = encode(Image.new("RGB", (8, 8)), "PCX")
    response = gateway_client.post("/v1/predict", data={"images": [(io.BytesIO(data), "x.pcx")]})
    assert response.status_code == 415
    message = response.get_json()["error"]["message"]
    assert "WebP" in message and "TIFF" in message
