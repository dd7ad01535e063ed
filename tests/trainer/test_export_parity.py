"""Train/serve skew guard: the bytes signature and the gateway's Pillow preprocessing agree on real photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.preprocess import to_model_input
from tests.tfserving_session import TFServingSession

pytestmark = pytest.mark.slow

PHOTOS = 40  # enough real photos to catch a systematic resize difference, few enough to stay fast
UPSCALED = (97, 75)  # odd, non-square, larger than 32x32: both resize passes do real filtering
# Pixel contract, measured on the 200 sample photos at several sizes: the graph reproduces Pillow's
# two-pass resize exactly except where Pillow's fixed-point filter weights round the other way: at
# most 1 level, on about 0.1-0.2% of pixel values (0.25% worst seen). A wrong filter, rounding mode,
# JPEG IDCT or pass order shows up as 2+ levels or 5-15% of values differing.
MAX_PIXEL_DIFF = 1
MAX_DIFFERING_FRACTION = 0.005
# Probabilities: a 1-level change in ~0.1% of inputs moves the softmax by at most ~1e-3 for the models
# here (measured: see the report printed by -s); 5e-3 leaves margin yet fails on any real skew, which
# moves probabilities by 1e-2 and more.
PROB_ATOL = 5e-3


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def encoded_photos(cifar_sample) -> dict[str, list[bytes]]:
    """Real CIFAR-10 photos upscaled to 97x75 and saved as JPEG and as PNG."""
    photos = [
        Image.open(path).convert("RGB").resize(UPSCALED, Image.Resampling.BICUBIC) for path, _ in cifar_sample
    ]
    return {fmt: [_encode(p, fmt) for p in photos[:PHOTOS]] for fmt in ("JPEG", "PNG", "GIF", "BMP")}


@pytest.fixture(scope="module")
def session(exported_model):
    with TFServingSession.load(exported_model.path) as loaded:
        yield loaded


def _gateway_pixels(encoded: list[bytes]) -> np.ndarray:
    """The pixels the gateway feeds the model: its own upload decoding, then the shared resize."""
    from serving.images import decode_image

    return np.stack(
        [to_model_input(decode_image(b, filename="photo", max_pixels=10**8)) for b in encoded]
    ).astype(np.float32)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_graph_decode_and_resize_matches_pillow_pixels(encoded_photos, fmt):
    import tensorflow as tf

    from trainer.export.savedmodel import decode_and_resize

    encoded = encoded_photos[fmt]
    graph = np.stack([decode_and_resize(tf.constant(b)).numpy() for b in encoded])
    diff = np.abs(graph - _gateway_pixels(encoded))
    print(f"\n{fmt}: max pixel diff {diff.max():.0f}, fraction differing {np.mean(diff > 0):.5f}")
    assert diff.max() <= MAX_PIXEL_DIFF
    assert np.mean(diff > 0) <= MAX_DIFFERING_FRACTION


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_bytes_signature_agrees_with_gateway_preprocessing(session, encoded_photos, fmt):
    encoded = encoded_photos[fmt]
    via_bytes = session.run("serving_bytes", {"image_bytes": np.array(encoded, dtype=object)})
    via_gateway = session.run("serving_default", {"images": _gateway_pixels(encoded)})
    p_bytes, p_gateway = via_bytes["probabilities"], via_gateway["probabilities"]
    print(f"\n{fmt}: max probability diff {np.abs(p_bytes - p_gateway).max():.2e}")
    np.testing.assert_array_equal(p_bytes.argmax(axis=1), p_gateway.argmax(axis=1))
    np.testing.assert_allclose(p_bytes, p_gateway, atol=PROB_ATOL, rtol=0)


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

    from trainer.export.savedmodel import decode_and_resize

    photos = [
        Image.open(p).convert("RGB").resize(UPSCALED, Image.Resampling.BICUBIC) for p, _ in cifar_sample[:5]
    ]
    encoded = _variant(photos, kind)
    graph = decode_and_resize(tf.constant(encoded)).numpy()
    assert graph.shape == (32, 32, 3)
    assert np.abs(graph - _gateway_pixels([encoded])[0]).max() <= MAX_PIXEL_DIFF
