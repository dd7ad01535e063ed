"""Encoded image bytes -> the model's input, in TensorFlow ops: the `serving_bytes` and `explain_bytes`
path, the gateway's (serving/images.py `decode_image`, then contract/preprocess.py) bit for bit.

Refuse an image whose header declares over MAX_PIXELS before decoding it (`refuse_large_declared`),
decode any format to RGB (`decode_rgb`: a large JPEG at a reduced scale as Pillow's `draft` decodes it,
a JPEG turned upright by its EXIF Orientation, transparency composited on white), refuse a side over
MAX_SIDE, then resize as Pillow 13 does (`resize_like_pillow`).
"""

from __future__ import annotations

import tensorflow as tf

from contract.preprocess import DECODE_MIN_SIDE, JPEG_SCALES
from contract.signatures import CHANNELS, INPUT_SIZE, MAX_PIXELS, MAX_SIDE
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
    return resize_like_pillow(_refuse_long_sides(decode_rgb(refuse_large_declared(encoded))))


def refuse_large_declared(encoded: tf.Tensor, max_pixels: int = MAX_PIXELS) -> tf.Tensor:
    """`encoded`, once its header is checked to declare at most `max_pixels` (an InvalidArgumentError,
    TF Serving's INVALID_ARGUMENT, otherwise). Routed through the check so decoding waits for it.

    The decoders allocate what the header declares: a 100 KiB PNG declaring 20000x20000 would take
    gigabytes (issue 13). The gateway refuses the same images on their headers (serving/images.py).
    """
    check = tf.debugging.assert_less_equal(
        declared_pixels(encoded),
        tf.constant(max_pixels, tf.int64),
        message=f"image declares over {max_pixels} pixels; downscale it before sending "
        "(the model sees 32x32)",
    )
    with tf.control_dependencies([check]):
        return tf.identity(encoded)


def declared_pixels(encoded: tf.Tensor) -> tf.Tensor:
    """Width x height (int64 scalar) as the header of a JPEG, PNG, GIF or BMP declares them, read
    without decoding; 0 for anything else (the decoder then refuses it with its own error).

    JPEG: its SOF marker (tf.image.extract_jpeg_shape); PNG: IHDR, big-endian uint32 width and height
    at bytes 16 and 20; GIF: the logical screen, little-endian uint16 at 6 and 8 (the canvas every
    frame is decoded into); BMP: int32 at 18 and 22 (a negative height means top-down rows), or
    uint16 at 18 and 20 in the old 12-byte OS/2 core header.
    """
    # The first 32 bytes, zero-padded, as int64 values: short inputs read as zeros, never out of range.
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, 0, 32), b"\0" * 32]), 0, 32)
    b = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

    def little(offset: int, size: int) -> tf.Tensor:
        return sum(b[offset + i] * (1 << (8 * i)) for i in range(size))

    def big(offset: int, size: int) -> tf.Tensor:
        return sum(b[offset + i] * (1 << (8 * (size - 1 - i))) for i in range(size))

    def signed32(value: tf.Tensor) -> tf.Tensor:
        return tf.where(value >= 1 << 31, value - (1 << 32), value)

    png = big(16, 4) * big(20, 4)
    gif = little(6, 2) * little(8, 2)
    bmp = tf.where(
        little(14, 4) == 12,
        little(18, 2) * little(20, 2),
        tf.abs(signed32(little(18, 4))) * tf.abs(signed32(little(22, 4))),
    )
    magic = tf.strings.substr(head, 0, 8)
    other = tf.where(
        magic == b"\x89PNG\r\n\x1a\n",
        png,
        tf.where(
            tf.strings.substr(head, 0, 3) == b"GIF",
            gif,
            tf.where(tf.strings.substr(head, 0, 2) == b"BM", bmp, tf.constant(0, tf.int64)),
        ),
    )
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64)),
        lambda: other,
    )


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
    pixels = _decode_jpeg_reduced(encoded)
    return tf.cast(apply_orientation(pixels, jpeg_exif_orientation(encoded)), tf.float32)


def _decode_jpeg_reduced(encoded: tf.Tensor) -> tf.Tensor:
    """uint8 [H', W', 3]: the JPEG decoded at the 1/N scale contract.preprocess.jpeg_decode_scale
    picks from its header (the stored sides, before EXIF orientation, as Pillow's `draft` reads them).

    decode_jpeg's `ratio` runs libjpeg's DCT scaling, the very arithmetic of Pillow's draft; `ratio` is
    an attribute, fixed when the graph is built, so each scale is its own branch.
    """
    shape = tf.image.extract_jpeg_shape(encoded)  # [height, width, channels], read from the SOF marker
    fit = tf.minimum(shape[0], shape[1]) // DECODE_MIN_SIDE
    ascending = sorted(JPEG_SCALES)  # 1, 2, 4, 8: branch i is scale ascending[i]
    branch = tf.reduce_sum(tf.cast(fit >= tf.constant(ascending[1:], fit.dtype), tf.int32))
    return tf.switch_case(
        branch,
        [
            lambda scale=scale: tf.io.decode_jpeg(
                encoded, channels=3, dct_method="INTEGER_ACCURATE", ratio=scale
            )
            for scale in ascending
        ],
    )


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
