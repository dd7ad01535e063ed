"""client/images.py: the pixels the gRPC client's pixel path sends equal the gateway's."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from client.images import to_pixels
from client.results import ClientError
from contract.preprocess import to_model_input
from serving.images import decode_image
from tests.serving.test_images import GARBLED_EXIF


def _jpeg(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **params)
    return buffer.getvalue()


def _gateway(data: bytes) -> np.ndarray:
    return to_model_input(decode_image(data, filename="x.jpg", max_pixels=10**7))


def test_oriented_photo_gives_the_gateways_pixels() -> None:
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(image, exif=exif)
    np.testing.assert_array_equal(to_pixels("x.jpg", data), _gateway(data))
    assert not np.array_equal(to_pixels("x.jpg", data), to_pixels("x.jpg", _jpeg(image)))  # turned


@pytest.mark.parametrize("exif", sorted(GARBLED_EXIF))
def test_garbled_exif_gives_the_gateways_unrotated_pixels(exif: str) -> None:
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    data = _jpeg(image, dpi=(72, 72), exif=GARBLED_EXIF[exif])
    np.testing.assert_array_equal(to_pixels("x.jpg", data), _gateway(data))


def test_not_an_image_names_the_file() -> None:
    with pytest.raises(ClientError, match="'notes.txt' cannot be decoded as an image"):
        to_pixels("notes.txt", b"hello")
