"""Write a Keras model as a TensorFlow Serving SavedModel with the two signatures of the contract.

Signatures (tag `serve`, see docs/architecture.md):
  * `serving_default`: `images` float32 [N, 32, 32, 3], RGB 0..255 (normalization is inside the model);
  * `serving_bytes`: `image_bytes` string [N], encoded JPEG/PNG/GIF/BMP of any size, decoded, turned
    upright by a JPEG's EXIF Orientation and resized in the graph exactly as the gateway does it
    (serving/images.py, serving/preprocess.py);
  * outputs of both: `probabilities` float32 [N, C] and `classes` string [N, C].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf

INPUT_SIZE = 32  # must equal serving.preprocess.INPUT_SIZE
MAX_SIDE = 65535  # pixels per image side, JPEG's own limit; must equal serving.preprocess.MAX_SIDE
SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
IMAGES_KEY = "images"
IMAGE_BYTES_KEY = "image_bytes"
PROBABILITIES_KEY = "probabilities"
CLASSES_KEY = "classes"


def decode_and_resize(encoded: tf.Tensor) -> tf.Tensor:
    """One encoded image (scalar string) -> float32 [32, 32, 3] holding integer pixel values 0..255.

    Mirrors the gateway (serving/images.py `decode_image`, then serving/preprocess.py) bit for bit:
    `decode_rgb` (RGB, a JPEG turned upright by its EXIF Orientation), then `resize_like_pillow`, the
    very uint8 pixels of Pillow's `resize((32, 32), BILINEAR)` for an image of any size.
    """
    image = decode_rgb(encoded)
    # The resize builds a dense [32, side] weight matrix per pass, so a hostile 10-million-pixel-wide
    # BMP would cost gigabytes; no photo has a side over JPEG's own limit, and the gateway refuses the
    # same images (serving/images.py). Routed through the check so it runs before the resize.
    check = tf.debugging.assert_less_equal(
        tf.reduce_max(tf.shape(image)[:2]),
        MAX_SIDE,
        message=f"image side over {MAX_SIDE} pixels; downscale it before sending (the model sees 32x32)",
    )
    with tf.control_dependencies([check]):
        image = tf.identity(image)
    # The image is upright by now, so the resize sees the very pixels Pillow's resize sees.
    return resize_like_pillow(image)


# Pillow's resize arithmetic for 8-bit images (src/libImaging/Resample.c): the filter weights become
# integers scaled by 2**PRECISION_BITS, and each output is their sum times the pixels, plus half of
# that scale, shifted right (floor) and clipped to 0..255. PRECISION_BITS = 32 - 8 - 2 leaves room in
# Pillow's int32 sums for 8-bit pixels and weights that overshoot.
_PRECISION_BITS = 32 - 8 - 2
_BILINEAR_SUPPORT = 1.0  # the triangle filter reaches 1 input pixel each side, times the downscale


def resize_like_pillow(image: tf.Tensor) -> tf.Tensor:
    """float32 [H, W, 3] integer pixels 0..255 -> float32 [32, 32, 3]: exactly the pixels of Pillow's
    `Image.resize((32, 32), Image.Resampling.BILINEAR)` on the same uint8 image.

    Pillow resizes in two separable passes and rounds to uint8 after each, so the order of the passes
    shows in the result. Pillow 13 (`ImagingResampleInner`) runs the vertical pass first when the
    height shrinks by more than twice as many pixels as the width (that makes the horizontal pass
    cheaper), else the horizontal one first; older releases order tall images differently, so the
    gateway must run Pillow 13 for the pixels to agree. Pillow skips a pass whose size is already 32;
    here that pass's coefficients are the identity (weights 1 and 0 at scale 1), so it changes nothing.
    """
    height_shrink = tf.shape(image)[0] - INPUT_SIZE
    width_shrink = tf.shape(image)[1] - INPUT_SIZE
    return tf.cond(
        (height_shrink > 0) & (height_shrink > 2 * width_shrink),
        lambda: _horizontal_pass(_vertical_pass(image)),
        lambda: _vertical_pass(_horizontal_pass(image)),
    )


def _horizontal_pass(pixels: tf.Tensor) -> tf.Tensor:
    """float32 [H, W, 3] -> [H, 32, 3], integer pixels: Pillow's `ImagingResampleHorizontal_8bpc`."""
    height, width = tf.shape(pixels)[0], tf.shape(pixels)[1]
    # Channels first, each row of each channel is a contiguous line of W values to resample.
    lines = tf.reshape(tf.transpose(pixels, [2, 0, 1]), [3 * height, width])
    sums = _exact_matmul(lines, _pillow_coefficients(width))  # [3H, 32]
    return tf.transpose(tf.reshape(_fixed_point_to_pixels(sums), [3, height, INPUT_SIZE]), [1, 2, 0])


def _vertical_pass(pixels: tf.Tensor) -> tf.Tensor:
    """float32 [H, W, 3] -> [32, W, 3], integer pixels: Pillow's `ImagingResampleVertical_8bpc`."""
    height, width = tf.shape(pixels)[0], tf.shape(pixels)[1]
    # Each column of this [H, 3W] matrix is a line to resample; the matmul reads it transposed.
    columns = tf.reshape(pixels, [height, width * 3])
    sums = _exact_matmul(columns, _pillow_coefficients(height), lines_transposed=True)  # [3W, 32]
    return tf.reshape(tf.transpose(_fixed_point_to_pixels(sums)), [INPUT_SIZE, width, 3])


def _fixed_point_to_pixels(sums: tf.Tensor) -> tf.Tensor:
    """float64 integer sums -> float32 pixels, as Pillow's `clip8`: add 2**21 (half of the scale),
    shift right by 22 bits (a floor), clip to 0..255. Exact: it divides by a power of two."""
    shifted = tf.floor((sums + 2.0 ** (_PRECISION_BITS - 1)) / 2.0**_PRECISION_BITS)
    return tf.cast(tf.clip_by_value(shifted, 0.0, 255.0), tf.float32)


# A float32 matmul is exact when every product and partial sum is an integer below 2**24 (float32's
# 24-bit significand), whatever order and fused multiply-adds it uses.
_FLOAT32_EXACT_BELOW = 2**24
# Pieces of at most 11 bits also stay exact on GPUs, whose float32 matmuls by default round their
# inputs to TensorFloat-32 (11 significant bits); pixels (8 bits) always do.
_MAX_PIECE_BITS = 11
_COEFFICIENT_BITS = _PRECISION_BITS + 1  # a coefficient is at most 2**22
# Below this many pixel values, casting them to float64 costs less than cutting coefficients up.
_PIECES_FROM_VALUES = 1 << 20


def _exact_matmul(lines: tf.Tensor, coefficients: tf.Tensor, lines_transposed: bool = False) -> tf.Tensor:
    """float32 [M, N] lines of integer pixels 0..255 ([N, M] if lines_transposed) times float64
    [32, N] integer coefficients -> float64 [M, 32]: exactly the sums Pillow accumulates in int32.

    A float64 matmul is exact here: every product (at most 255 * 2**22) and partial sum (below 2**31)
    is an integer far below 2**53, in whatever order the matmul adds. But casting a 12-megapixel photo
    to float64 made its resize about three times slower (measured). So a large image is summed in
    float32, exact for integers below 2**24 only: each coefficient is cut into `bits`-bit pieces,
    k = sum_j piece_j << (bits * j), with `bits` as large as keeps every piece's sum (at most
    255 * taps * (2**bits - 1) over a line's `taps` nonzero coefficients) below 2**24; one float32
    matmul sums all the pieces, and float64 shifts the piece sums back into place and adds them.
    """
    taps = tf.reduce_max(tf.math.count_nonzero(coefficients, axis=1))
    candidates = tf.range(1, _MAX_PIECE_BITS + 1, dtype=tf.int64)
    fits = 255 * taps * (2**candidates - 1) < _FLOAT32_EXACT_BELOW
    bits = tf.cast(tf.reduce_max(tf.where(fits, candidates, 0)), tf.int32)  # 0: over 65,793 taps

    def in_float64() -> tf.Tensor:
        pixels = tf.cast(lines, tf.float64)
        return tf.matmul(pixels, coefficients, transpose_a=lines_transposed, transpose_b=True)

    def in_pieces() -> tf.Tensor:
        count = (_COEFFICIENT_BITS + bits - 1) // bits
        shifts = bits * tf.range(count)
        integers = tf.cast(coefficients, tf.int32)
        pieces = tf.bitwise.right_shift(integers, shifts[:, tf.newaxis, tf.newaxis]) % 2**bits
        pieces = tf.reshape(tf.cast(pieces, tf.float32), [count * INPUT_SIZE, -1])  # [count * 32, N]
        sums = tf.matmul(lines, pieces, transpose_a=lines_transposed, transpose_b=True)
        sums = tf.cast(tf.reshape(sums, [-1, count, INPUT_SIZE]), tf.float64)
        return tf.einsum("mcj,c->mj", sums, tf.cast(2**shifts, tf.float64))

    small = tf.size(lines, out_type=tf.int64) < _PIECES_FROM_VALUES
    return tf.cond(small | (bits == 0), in_float64, in_pieces)


def _pillow_coefficients(in_size: tf.Tensor) -> tf.Tensor:
    """float64 [32, in_size]: the integer weight (scaled by 2**22) of each input pixel in each of the
    32 outputs along one axis, as Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` make them
    for the BILINEAR filter.

    Each step is Pillow's double arithmetic in Pillow's order, so that every truncation to int lands
    where Pillow's does: the weights are the triangle filter over a window of input pixels, divided
    by their sum, scaled and rounded; a different order or precision moves some rounding by one.
    """
    scale = tf.cast(in_size, tf.float64) / INPUT_SIZE
    filterscale = tf.maximum(scale, 1.0)  # downscaling widens the filter (antialiasing)
    support = _BILINEAR_SUPPORT * filterscale
    inverse_filterscale = 1.0 / filterscale
    center = (tf.range(INPUT_SIZE, dtype=tf.float64) + 0.5) * scale
    # Each output's window [first, end) of input pixels. C's (int) and tf.cast both truncate toward
    # zero (not floor), which matters for a negative `first` before it is clamped to 0.
    first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
    end = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size)
    # Tap t of output i reads input pixel first[i] + t; taps past the window's end weigh 0.
    offsets = tf.range(tf.reduce_max(end - first))
    columns = first[:, tf.newaxis] + offsets
    distance = tf.abs((tf.cast(columns, tf.float64) - center[:, tf.newaxis] + 0.5) * inverse_filterscale)
    weights = tf.where((columns < end[:, tf.newaxis]) & (distance < 1.0), 1.0 - distance, 0.0)
    # Pillow leaves a window whose weights sum to 0 as it is (all zero); divide_no_nan does the same.
    normalized = tf.math.divide_no_nan(weights, _sum_left_to_right(weights)[:, tf.newaxis])
    # (int)(0.5 + w * 2**22): truncation is floor here, as bilinear weights are never negative.
    fixed_point = tf.floor(0.5 + normalized * 2.0**_PRECISION_BITS)
    # Spread the windows into a dense [32, in_size] matrix for one matmul. Taps past a window's end
    # (weight 0) are clamped onto the last column; scatter_nd adds duplicates, and adding 0 is exact.
    rows = tf.broadcast_to(tf.range(INPUT_SIZE)[:, tf.newaxis], tf.shape(columns))
    indices = tf.stack([rows, tf.minimum(columns, in_size - 1)], axis=-1)
    return tf.scatter_nd(indices, fixed_point, [INPUT_SIZE, in_size])


def _sum_left_to_right(values: tf.Tensor) -> tf.Tensor:
    """float64 [N, T] -> [N]: each row's sum, added one value at a time from the left like Pillow's
    `ww += w` loop. A float sum's last bit depends on the order of the additions (tf.reduce_sum adds
    in blocks, a GPU cumsum in a tree), and the weights are divided by it, so the order is fixed here
    by a loop: at most 2 * ceil(downscale) + 1 steps on [N] vectors."""

    def add_next(t: tf.Tensor, total: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return t + 1, total + values[:, t]

    _, total = tf.while_loop(
        lambda t, _: t < tf.shape(values)[1], add_next, (tf.constant(0), tf.zeros_like(values[:, 0]))
    )
    return total


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """One encoded image (scalar string) -> float32 [H, W, 3] RGB, the pixels of the gateway's
    `decode_image` (Pillow) before the resize.

    JPEGs go through decode_jpeg with INTEGER_ACCURATE because that is libjpeg's default IDCT
    (JDCT_ISLOW), the one Pillow uses; decode_image would pick the faster, less exact IDCT and
    disagree with the gateway by a few levels per pixel. TensorFlow's decoders ignore EXIF, so the
    JPEG's Orientation tag is read from the bytes (`_jpeg_exif_orientation`) and applied as
    `ImageOps.exif_transpose` does, before anything else sees the pixels; a missing, malformed or
    out-of-range tag leaves the image as decoded, never an error. Only a JPEG's EXIF is read: the
    orientation Pillow also takes from XMP (`tiff:Orientation`, when EXIF has none) or from a PNG's
    eXIf chunk is not applied here (docs/clients.md).
    """
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.cast(
            _apply_orientation(
                tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
                _jpeg_exif_orientation(encoded),
            ),
            tf.float32,
        ),
        lambda: tf.cond(
            tf.strings.substr(encoded, 0, 3) == b"GIF",
            # expand_animations=False: a GIF gives its first frame as [H, W, 3], like Pillow's open().
            lambda: tf.cast(tf.io.decode_image(encoded, channels=3, expand_animations=False), tf.float32),
            lambda: _composite_on_white(tf.io.decode_image(encoded, channels=4, expand_animations=False)),
        ),
    )
    image.set_shape([None, None, 3])
    return image


# Cameras write EXIF as the first segment after SOI (JFIF's APP0 may come before it), and one segment
# holds at most 64 KiB, so the tag lies in the file's first 64 KiB; only those bytes are looked at.
_EXIF_SEARCH_BYTES = 64 * 1024
_EXIF_ORIENTATION_TAG = 0x0112
# Per TIFF type 0..17: bytes per value for the types Pillow reads (0: a type it skips), and the width
# of the integer types whose first value Pillow compares with 1..8 (0: BYTE and UNDEFINED give bytes,
# ASCII a str, the rationals and floats are not read here).
_TIFF_TYPE_SIZES = (0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 0, 0, 8, 0)
_TIFF_INTEGER_WIDTHS = (0, 0, 0, 2, 4, 0, 1, 0, 2, 4, 0, 0, 0, 4, 0, 0, 8, 0)


def _jpeg_exif_orientation(encoded: tf.Tensor) -> tf.Tensor:
    """The EXIF Orientation (int32 scalar, 1..8) of a JPEG; 1 when it is absent or unreadable.

    Reads what Pillow's `getexif()` reads for a JPEG: among the segments before the scan, the first
    APP1 that starts with b"Exif\0\0"; its TIFF header ("II" little- or "MM" big-endian, magic 42,
    IFD0 offset); and in IFD0 the first entry with tag 0x0112 (normally one SHORT). Every read is
    checked against the segment's end, so a truncated or garbled block gives 1, not an error: a
    photo that decodes must not be refused for its metadata.
    """
    data = tf.io.decode_raw(tf.strings.substr(encoded, 0, _EXIF_SEARCH_BYTES), tf.uint8)
    size = tf.size(data, out_type=tf.int64)
    # int64: offsets are 32-bit unsigned. One zero appended so that any read past the end gives 0.
    padded = tf.concat([tf.cast(data, tf.int64), tf.zeros([1], tf.int64)], axis=0)

    def byte(i: tf.Tensor) -> tf.Tensor:
        return tf.gather(padded, tf.clip_by_value(i, 0, size))

    def matches(i: tf.Tensor, pattern: bytes) -> tf.Tensor:
        return tf.reduce_all(tf.equal(byte(i + tf.range(len(pattern), dtype=tf.int64)), list(pattern)))

    # 1. Walk the marker segments from after SOI (FF D8) to the start of scan: FF, the marker, then a
    #    big-endian length that counts itself. Walking, rather than searching for b"Exif", cannot be
    #    fooled by those bytes inside another segment. Finds where the TIFF data starts and ends.
    def walk(pos: tf.Tensor, tiff: tf.Tensor, end: tf.Tensor):
        marker = byte(pos + 1)
        length = byte(pos + 2) * 256 + byte(pos + 3)
        fill = marker == 0xFF  # FF FF: padding before a marker
        stop = (byte(pos) != 0xFF) | (marker == 0xDA) | (marker == 0xD9) | (~fill & (length < 2))
        is_exif = ~stop & (marker == 0xE1) & (length >= 8) & matches(pos + 4, b"Exif\0\0")
        next_pos = tf.where(stop | is_exif, size, tf.where(fill, pos + 1, pos + 2 + length))  # size: done
        return next_pos, tf.where(is_exif, pos + 10, tiff), tf.where(is_exif, pos + 2 + length, end)

    none = tf.constant(-1, tf.int64)
    _, tiff, end = tf.while_loop(
        lambda pos, tiff, end: pos + 4 <= size,
        walk,
        (tf.constant(2, tf.int64), none, none),
        maximum_iterations=_EXIF_SEARCH_BYTES,  # each step advances at least one byte
    )
    # Pillow also drops a second b"Exif\0\0" that some writers repeat.
    tiff = tf.where((tiff >= 0) & matches(tiff, b"Exif\0\0"), tiff + 6, tiff)
    end = tf.minimum(end, size)

    # 2. The TIFF header; Pillow also accepts the magic 42 written in the other byte order.
    little = matches(tiff, b"II")
    valid = (tiff >= 0) & (tiff + 8 <= end) & (little | matches(tiff, b"MM"))
    valid &= matches(tiff + 2, b"\x2a\x00") | matches(tiff + 2, b"\x00\x2a")

    def uint(i: tf.Tensor, width: int | tf.Tensor) -> tf.Tensor:
        """The unsigned `width`-byte (at most 8) integer(s) at offset(s) `i`, in the TIFF's byte order."""
        k = tf.range(8, dtype=tf.int64)  # byte k of the field...
        width = tf.expand_dims(tf.cast(width, tf.int64), -1)
        place = tf.where(little, k, width - 1 - k)  # ...is worth 256**place
        weights = tf.where(k < width, tf.bitwise.left_shift(tf.ones_like(place), 8 * tf.maximum(place, 0)), 0)
        return tf.reduce_sum(byte(tf.expand_dims(i, -1) + k) * weights, axis=-1)

    ifd = tiff + uint(tiff + 4, 4)  # offsets count from the TIFF header
    valid &= ifd + 2 <= end

    # 3. IFD0: an entry count, then 12-byte entries (tag, type, value count, then the values when
    #    they fit in 4 bytes, else their offset). Pillow keeps the entries that fit before the end.
    count = tf.where(valid, tf.minimum(uint(ifd, 2), (end - ifd - 2) // 12), 0)
    entries = ifd + 2 + 12 * tf.range(count)
    tags, types = uint(entries, 2), tf.minimum(uint(entries + 2, 2), 17)
    sizes = uint(entries + 4, 4) * tf.gather(tf.constant(_TIFF_TYPE_SIZES, tf.int64), types)
    out_of_line = sizes > 4
    values = tf.where(out_of_line, tiff + uint(entries + 8, 4), entries + 8)
    # Pillow reads the entries in order: it skips unknown types and empty values; once the
    # out-of-line values add up to more than the data holds it skips the rest of them unread; and
    # it gives up on the IFD at the first out-of-line value that lies past the end, so a later
    # Orientation is never seen. (It also skips a tag repeated after being read; not done here.)
    skipped = out_of_line & (tf.cumsum(tf.where(out_of_line, sizes, 0)) > end - tiff)
    unreadable = out_of_line & ~skipped & (values + sizes > end)
    read = (sizes > 0) & ~skipped & ~unreadable & (tf.cumsum(tf.cast(unreadable, tf.int64)) == 0)

    # The first value of the first Orientation entry read; exif_transpose applies it if in 2..8.
    widths = tf.gather(tf.constant(_TIFF_INTEGER_WIDTHS, tf.int64), types)
    first_values = tf.where(widths > 0, uint(values, widths), 0)
    found = tf.boolean_mask(first_values, read & tf.equal(tags, _EXIF_ORIENTATION_TAG))
    orientation = tf.concat([found, [1]], axis=0)[0]
    return tf.cast(tf.where((orientation >= 1) & (orientation <= 8), orientation, 1), tf.int32)


def _apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """[H, W, C] -> the image turned upright, as `ImageOps.exif_transpose` does for orientation 1..8.

    Pillow's Transpose methods in array terms (rows are y): ROTATE_90 turns counter-clockwise like
    tf.image.rot90(k=1), TRANSPOSE mirrors across the main diagonal (tf.image.transpose), TRANSVERSE
    across the other one (transpose, then 180 degrees). All are exact pixel moves.
    """
    branches = [
        lambda: image,  # 1: already upright
        lambda: tf.image.flip_left_right(image),  # 2: FLIP_LEFT_RIGHT
        lambda: tf.image.rot90(image, k=2),  # 3: ROTATE_180
        lambda: tf.image.flip_up_down(image),  # 4: FLIP_TOP_BOTTOM
        lambda: tf.image.transpose(image),  # 5: TRANSPOSE
        lambda: tf.image.rot90(image, k=3),  # 6: ROTATE_270
        lambda: tf.image.rot90(tf.image.transpose(image), k=2),  # 7: TRANSVERSE
        lambda: tf.image.rot90(image, k=1),  # 8: ROTATE_90
    ]
    return tf.switch_case(orientation - 1, branches, default=lambda: image)


def _composite_on_white(rgba: tf.Tensor) -> tf.Tensor:
    """RGBA uint8 -> RGB float32 over a white background, as the gateway's Pillow path does
    (serving/preprocess.py `to_rgb`: `Image.alpha_composite` on white, rounded); an opaque image
    (alpha 255 everywhere, also what PNGs and BMPs without alpha decode to) is unchanged."""
    rgba = tf.cast(rgba, tf.float32)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    return _round_half_up((rgb * alpha + 255.0 * (255.0 - alpha)) / 255.0)


def _round_half_up(pixels: tf.Tensor) -> tf.Tensor:
    # floor(x + 0.5), not tf.round: Pillow rounds halves up, tf.round rounds them to even (used for
    # the alpha compositing above, where exact halves occur).
    return tf.clip_by_value(tf.floor(pixels + 0.5), 0.0, 255.0)


def build_archive(model: keras.Model, class_names: Sequence[str]) -> keras.export.ExportArchive:
    """An ExportArchive tracking `model` with both serving signatures registered."""
    if not class_names:
        raise ValueError("class_names is empty: the exported model must label its outputs")
    names = tf.constant(list(class_names), dtype=tf.string)

    def outputs(images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.cast(model(images, training=False), tf.float32)
        # Class names repeated per row: TensorFlow's classification convention, so any client can
        # label the scores without a side file.
        classes = tf.tile(names[tf.newaxis, :], [tf.shape(images)[0], 1])
        return {PROBABILITIES_KEY: probabilities, CLASSES_KEY: classes}

    def serving_default(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(images)

    def serving_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = tf.map_fn(
            decode_and_resize,
            image_bytes,
            fn_output_signature=tf.TensorSpec([INPUT_SIZE, INPUT_SIZE, 3], tf.float32),
        )
        return outputs(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SERVING_DEFAULT,
        serving_default,
        input_signature=[tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.float32, name=IMAGES_KEY)],
    )
    archive.add_endpoint(
        SERVING_BYTES,
        serving_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_KEY)],
    )
    # Grad-CAM signatures (explain, explain_bytes) when the model has a conv block to explain from.
    from trainer.export.gradcam import add_explain_endpoints  # local: gradcam imports this module

    add_explain_endpoints(archive, model, names)
    return archive


def export_savedmodel(model: keras.Model, class_names: Sequence[str], export_dir: str | Path) -> Path:
    """Write the SavedModel (graph, variables, signatures) into `export_dir`, which must not exist.

    Writes no assets.extra; publish.py adds warmup requests and the model card and makes the
    version visible atomically.
    """
    export_dir = Path(export_dir)
    if export_dir.exists():
        raise FileExistsError(f"{export_dir} already exists; export into a fresh directory")
    num_outputs = int(model.output_shape[-1])
    if num_outputs != len(class_names):
        raise ValueError(
            f"model has {num_outputs} outputs but {len(class_names)} class names were given; "
            "export the run directory whose dataset.json matches its model.keras"
        )
    build_archive(model, class_names).write_out(str(export_dir), verbose=False)
    return export_dir


class ExportVerificationError(RuntimeError):
    """The written SavedModel does not reproduce the Keras model; it must not be published."""


def verify_export(
    model: keras.Model, class_names: Sequence[str], export_dir: str | Path, atol: float = 1e-5
) -> None:
    """Reload `export_dir` and check `serving_default` reproduces `model` on a few pixel batches.

    Cheap insurance run before publishing: a graph that traced the wrong model state or lost the
    normalization constants is caught here instead of by the server's users.
    """
    import numpy as np

    loaded = tf.saved_model.load(str(export_dir))
    missing = {SERVING_DEFAULT, SERVING_BYTES} - set(loaded.signatures)
    if missing:
        raise ExportVerificationError(f"{export_dir} lacks signatures {sorted(missing)}")
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, INPUT_SIZE, INPUT_SIZE, 3)).astype(np.float32)
    out = loaded.signatures[SERVING_DEFAULT](**{IMAGES_KEY: tf.constant(pixels)})
    expected = np.asarray(model(pixels, training=False), dtype=np.float32)
    difference = float(np.max(np.abs(out[PROBABILITIES_KEY].numpy() - expected)))
    if difference > atol:
        raise ExportVerificationError(
            f"exported probabilities differ from the Keras model by {difference:.2e} (> {atol:.0e}); "
            "not publishing"
        )
    labels = [c.decode() for c in out[CLASSES_KEY].numpy()[0]]
    if labels != list(class_names):
        raise ExportVerificationError(f"exported classes {labels} differ from {list(class_names)}")
    from trainer.export.gradcam import verify_explain  # local: gradcam imports this module

    problem = verify_explain(loaded, tf.constant(pixels), expected, atol)
    if problem:
        raise ExportVerificationError(f"{problem}; not publishing")
