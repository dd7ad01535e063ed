"""trainer/export/graph_image/decode.py: every format decodes to the gateway's pixels, then 32x32 as
the gateway resizes (the pixel contract: identical, every value of every image)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.trainer.graph_image_cases import encode_photos, gateway_pixels, large_jpeg, upscaled_photos

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encoded_photos(cifar_sample) -> dict[str, list[bytes]]:
    return encode_photos(cifar_sample)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_graph_decode_and_resize_matches_pillow_pixels(encoded_photos, fmt):
    import tensorflow as tf

    from trainer.export.graph_image.decode import decode_and_resize

    encoded = encoded_photos[fmt]
    graph = np.stack([decode_and_resize(tf.constant(b)).numpy() for b in encoded])
    np.testing.assert_array_equal(graph, gateway_pixels(encoded))


def test_jpeg_decoding_uses_libjpegs_accurate_idct(encoded_photos):
    """Guards the reason for the JPEG branch: TF's default (fast) IDCT would disagree with Pillow."""
    import tensorflow as tf

    encoded = encoded_photos["JPEG"][:8]
    pillow = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in encoded]).astype(int)
    accurate = np.stack(
        [tf.io.decode_jpeg(b, channels=3, dct_method="INTEGER_ACCURATE").numpy() for b in encoded]
    )
    fast = np.stack([tf.io.decode_jpeg(b, channels=3).numpy() for b in encoded])
    assert np.abs(accurate.astype(int) - pillow).max() == 0
    assert np.abs(fast.astype(int) - pillow).max() > 0


def _variant(photos: list[Image.Image], kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "rgba_png":  # both composite the transparent parts on white
        image = photos[0].copy()
        image.putalpha(Image.fromarray((np.arange(75 * 97).reshape(75, 97) % 256).astype(np.uint8)))
        image.save(buffer, format="PNG")
    elif kind == "gray_alpha_png":  # LA: gray with transparency, composited on white on both sides
        image = photos[2].convert("L")
        alpha = Image.fromarray((255 - np.arange(75 * 97).reshape(75, 97) % 256).astype(np.uint8))
        Image.merge("LA", (image, alpha)).save(buffer, format="PNG")
    elif kind == "animated_gif":  # both take the first frame
        photos[1].save(buffer, format="GIF", save_all=True, append_images=photos[2:5], duration=100)
    elif kind == "grayscale_jpeg":
        photos[3].convert("L").save(buffer, format="JPEG")
    elif kind == "progressive_jpeg":
        photos[4].save(buffer, format="JPEG", progressive=True, subsampling=2)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "kind", ["rgba_png", "gray_alpha_png", "animated_gif", "grayscale_jpeg", "progressive_jpeg"]
)
def test_graph_matches_pillow_on_unusual_encodings(cifar_sample, kind):
    import tensorflow as tf

    from trainer.export.graph_image.decode import decode_and_resize

    encoded = _variant(upscaled_photos(cifar_sample[:5]), kind)
    graph = decode_and_resize(tf.constant(encoded)).numpy()
    assert graph.shape == (32, 32, 3)
    np.testing.assert_array_equal(graph, gateway_pixels([encoded])[0])


@pytest.mark.parametrize(
    "size", [(255, 700), (300, 260), (600, 520), (1100, 1030), (2047, 1100)], ids=lambda s: f"{s[0]}x{s[1]}"
)
@pytest.mark.parametrize("kind", ["420", "444", "progressive", "grayscale", "oriented"])
def test_large_jpegs_decode_reduced_to_the_gateways_pixels(size, kind):
    """Every scale (1, 2, 4, 8) and encoding: the graph's decode_jpeg(ratio=) gives the pixels of the
    gateway's Pillow `draft`, and the clients' pixel path and the trainer (decode_to_model_input) agree."""
    import tensorflow as tf

    from client.images import to_pixels
    from contract.preprocess import jpeg_decode_scale
    from trainer.export.graph_image.decode import decode_and_resize, decode_rgb

    encoded = large_jpeg(size, kind)
    decoded = decode_rgb(tf.constant(encoded)).numpy()
    scale = jpeg_decode_scale(*size)
    expected_shape = (-(-size[1] // scale), -(-size[0] // scale))
    assert decoded.shape[:2] == (expected_shape[::-1] if kind == "oriented" else expected_shape)
    served = gateway_pixels([encoded])[0]
    np.testing.assert_array_equal(decode_and_resize(tf.constant(encoded)).numpy(), served)
    np.testing.assert_array_equal(to_pixels("photo.jpg", encoded), served)
