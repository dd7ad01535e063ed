"""Encoded image bytes -> the model's input, in TensorFlow ops: the `serving_bytes` and `explain_bytes`
path, the gateway's (serving/images.py `decode_image`, then contract/preprocess.py) bit for bit.

Decode any format to RGB (`decode_rgb`: a JPEG turned upright by its EXIF Orientation, transparency
composited on white), refuse a side over MAX_SIDE, then resize as Pillow 13 does (`resize_like_pillow`).
"""

from __future__ import annotations

import tensorflow as tf

from contract.signatures import CHANNELS, INPUT_SIZE, MAX_SIDE
from trainer.export.graph_image.exif import apply_orientation, jpeg_exif_orientation
from trainer.export.graph_image.pillow_resize import resize_like_pillow


def decode_and_resize_batch(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded images (string [N]) -> float32 [N, 32, 32, 3]: `decode_and_resize` on each."""
    return tf.map_fn(
        decode_and_resize,
        image_bytes,
        fn_output_signature=tf.TensorSpec([INPUT_SIZE, INPUT_SIZE, CHANNELS], tf.float32),
    )


def decode_and_resize(encoded: tf.Tensor) -> tf.Tensor:
    """One encoded image (scalar string) -> float32 [32, 32, 3] holding integer pixel values 0..255.

    Mirrors the gateway bit for bit: `decode_rgb` (RGB, a JPEG turned upright by its EXIF
    Orientation), then `resize_like_pillow`, the very uint8 pixels of Pillow's
    `resize((32, 32), BILINEAR)` for an image of any size.
    """
    # The image is upright by now, so the resize sees the very pixels Pillow's resize sees.
    return resize_like_pillow(_refuse_long_sides(decode_rgb(encoded)))


def _refuse_long_sides(image: tf.Tensor) -> tf.Tensor:
    """`image`, once checked to have no side over MAX_SIDE (an InvalidArgumentError otherwise).

    The resize builds a dense [32, side] weight matrix per pass, so a hostile 10-million-pixel-wide
    BMP would cost gigabytes; no photo has a side over JPEG's own limit, and the gateway refuses the
    same images (serving/images.py). Routed through the check so it runs before the resize.
    """
    check = tf.debugging.assert_less_equal(
        tf.reduce_max(tf.shape(image)[:2]),
        MAX_SIDE,
        message=f"image side over {MAX_SIDE} pixels; downscale it before sending (the model sees 32x32)",
    )
    with tf.control_dependencies([check]):
        return tf.identity(image)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """One encoded image (scalar string) -> float32 [H, W, 3] RGB, the pixels of the gateway's
    `decode_image` (Pillow) before the resize.

    Only a JPEG's EXIF is read: the orientation Pillow also takes from XMP (`tiff:Orientation`, when
    EXIF has none) or from a PNG's eXIf chunk is not applied here (docs/clients.md).
    """
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: _decode_jpeg_upright(encoded),
        lambda: tf.cond(
            tf.strings.substr(encoded, 0, 3) == b"GIF",
            lambda: _decode_first_frame(encoded),
            lambda: _composite_on_white(tf.io.decode_image(encoded, channels=4, expand_animations=False)),
        ),
    )
    image.set_shape([None, None, CHANNELS])
    return image


def _decode_jpeg_upright(encoded: tf.Tensor) -> tf.Tensor:
    """A JPEG -> float32 RGB, turned upright by its EXIF Orientation as `ImageOps.exif_transpose` does,
    before anything else sees the pixels.

    decode_jpeg with INTEGER_ACCURATE because that is libjpeg's default IDCT (JDCT_ISLOW), the one
    Pillow uses; decode_image would pick the faster, less exact IDCT and disagree with the gateway by
    a few levels per pixel.
    """
    pixels = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
    return tf.cast(apply_orientation(pixels, jpeg_exif_orientation(encoded)), tf.float32)


def _decode_first_frame(encoded: tf.Tensor) -> tf.Tensor:
    """A GIF -> float32 RGB of its first frame, like Pillow's open() (expand_animations=False gives
    that frame as [H, W, 3])."""
    return tf.cast(tf.io.decode_image(encoded, channels=3, expand_animations=False), tf.float32)


def _composite_on_white(rgba: tf.Tensor) -> tf.Tensor:
    """RGBA uint8 -> RGB float32 over a white background, as the gateway's Pillow path does
    (contract/preprocess.py `to_rgb`: `Image.alpha_composite` on white, rounded); an opaque image
    (alpha 255 everywhere, also what PNGs and BMPs without alpha decode to) is unchanged."""
    rgba = tf.cast(rgba, tf.float32)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return _round_half_up((rgb * alpha + 255.0 * (255.0 - alpha)) / 255.0)


def _round_half_up(pixels: tf.Tensor) -> tf.Tensor:
    # floor(x + 0.5), not tf.round: Pillow rounds halves up, tf.round rounds them to even (used for
    # the alpha compositing above, where exact halves occur).
    return tf.clip_by_value(tf.floor(pixels + 0.5), 0.0, 255.0)
