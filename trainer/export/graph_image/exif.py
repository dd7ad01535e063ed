"""A JPEG's EXIF Orientation, read from its bytes and applied, in TensorFlow ops.

TensorFlow's JPEG decoder ignores EXIF, while the gateway turns every upload upright with Pillow's
`ImageOps.exif_transpose`; this reads the tag where Pillow's `getexif()` finds it and applies it the
same way. A missing, malformed or out-of-range tag gives orientation 1 (the image as decoded), never
an error: a photo that decodes must not be refused for its metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

# Cameras write EXIF as the first segment after SOI (JFIF's APP0 may come before it), and one segment
# holds at most 64 KiB, so the tag lies in the file's first 64 KiB; only those bytes are looked at.
_EXIF_SEARCH_BYTES = 64 * 1024
_EXIF_ORIENTATION_TAG = 0x0112
# Per TIFF type 0..17: bytes per value for the types Pillow reads (0: a type it skips), and the width
# of the integer types whose first value Pillow compares with 1..8 (0: BYTE and UNDEFINED give bytes,
# ASCII a str, the rationals and floats are not read here).
_TIFF_TYPE_SIZES = (0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 0, 0, 8, 0)
_TIFF_INTEGER_WIDTHS = (0, 0, 0, 2, 4, 0, 1, 0, 2, 4, 0, 0, 0, 4, 0, 0, 8, 0)
_IFD_ENTRY_BYTES = 12


def jpeg_exif_orientation(encoded: tf.Tensor) -> tf.Tensor:
    """The EXIF Orientation (int32 scalar, 1..8) of a JPEG; 1 when it is absent or unreadable.

    Reads what Pillow's `getexif()` reads for a JPEG: among the segments before the scan, the first
    APP1 that starts with b"Exif\\0\\0"; its TIFF header ("II" little- or "MM" big-endian, magic 42,
    IFD0 offset); and in IFD0 the first entry with tag 0x0112 (normally one SHORT). Every read is
    checked against the segment's end, so a truncated or garbled block gives 1, not an error.
    """
    data = _Bytes.head_of(encoded)
    tiff, end = _find_exif_block(data)
    little, valid = _tiff_header(data, tiff, end)
    ifd = tiff + data.uint(tiff + 4, 4, little)  # offsets count from the TIFF header
    valid &= ifd + 2 <= end
    orientation = _ifd0_orientation(data, little, tiff, ifd, end, valid)
    return tf.cast(tf.where((orientation >= 1) & (orientation <= 8), orientation, 1), tf.int32)


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
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


@dataclass(frozen=True)
class _Bytes:
    """The first _EXIF_SEARCH_BYTES of a file as int64 values (offsets are 32-bit unsigned), read at
    tensor offsets; a read past the end gives 0, so no read can fail."""

    padded: tf.Tensor  # int64 [size + 1]: the bytes and one zero
    size: tf.Tensor  # int64 scalar

    @classmethod
    def head_of(cls, encoded: tf.Tensor) -> _Bytes:
        data = tf.io.decode_raw(tf.strings.substr(encoded, 0, _EXIF_SEARCH_BYTES), tf.uint8)
        padded = tf.concat([tf.cast(data, tf.int64), tf.zeros([1], tf.int64)], axis=0)
        return cls(padded, tf.size(data, out_type=tf.int64))

    def at(self, i: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.padded, tf.clip_by_value(i, 0, self.size))

    def matches(self, i: tf.Tensor, pattern: bytes) -> tf.Tensor:
        return tf.reduce_all(tf.equal(self.at(i + tf.range(len(pattern), dtype=tf.int64)), list(pattern)))

    def uint(self, i: tf.Tensor, width: int | tf.Tensor, little: tf.Tensor) -> tf.Tensor:
        """The unsigned `width`-byte (at most 8) integer(s) at offset(s) `i`, little- or big-endian."""
        k = tf.range(8, dtype=tf.int64)  # byte k of the field...
        width = tf.expand_dims(tf.cast(width, tf.int64), -1)
        place = tf.where(little, k, width - 1 - k)  # ...is worth 256**place
        weights = tf.where(k < width, tf.bitwise.left_shift(tf.ones_like(place), 8 * tf.maximum(place, 0)), 0)
        return tf.reduce_sum(self.at(tf.expand_dims(i, -1) + k) * weights, axis=-1)


def _find_exif_block(data: _Bytes) -> tuple[tf.Tensor, tf.Tensor]:
    """(tiff, end) int64: where the first EXIF APP1's TIFF data starts and where its segment ends;
    -1 for both when there is none.

    Walks the marker segments from after SOI (FF D8) to the start of scan: FF, the marker, then a
    big-endian length that counts itself. Walking, rather than searching for b"Exif", cannot be
    fooled by those bytes inside another segment.
    """

    def walk(pos: tf.Tensor, tiff: tf.Tensor, end: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        marker = data.at(pos + 1)
        length = data.at(pos + 2) * 256 + data.at(pos + 3)
        fill = marker == 0xFF  # FF FF: padding before a marker
        stop = (data.at(pos) != 0xFF) | (marker == 0xDA) | (marker == 0xD9) | (~fill & (length < 2))
        is_exif = ~stop & (marker == 0xE1) & (length >= 8) & data.matches(pos + 4, b"Exif\0\0")
        # data.size ends the walk.
        next_pos = tf.where(stop | is_exif, data.size, tf.where(fill, pos + 1, pos + 2 + length))
        return next_pos, tf.where(is_exif, pos + 10, tiff), tf.where(is_exif, pos + 2 + length, end)

    none = tf.constant(-1, tf.int64)
    _, tiff, end = tf.while_loop(
        lambda pos, tiff, end: pos + 4 <= data.size,
        walk,
        (tf.constant(2, tf.int64), none, none),
        maximum_iterations=_EXIF_SEARCH_BYTES,  # each step advances at least one byte
    )
    # Pillow also drops a second b"Exif\0\0" that some writers repeat.
    tiff = tf.where((tiff >= 0) & data.matches(tiff, b"Exif\0\0"), tiff + 6, tiff)
    return tiff, tf.minimum(end, data.size)


def _tiff_header(data: _Bytes, tiff: tf.Tensor, end: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(little, valid) booleans: the TIFF header's byte order, and whether the header is sound (a
    block was found, the header fits, "II" or "MM", magic 42). Pillow also accepts the magic 42
    written in the other byte order."""
    little = data.matches(tiff, b"II")
    valid = (tiff >= 0) & (tiff + 8 <= end) & (little | data.matches(tiff, b"MM"))
    valid &= data.matches(tiff + 2, b"\x2a\x00") | data.matches(tiff + 2, b"\x00\x2a")
    return little, valid


def _ifd0_orientation(
    data: _Bytes, little: tf.Tensor, tiff: tf.Tensor, ifd: tf.Tensor, end: tf.Tensor, valid: tf.Tensor
) -> tf.Tensor:
    """int64: the first value of the first Orientation entry that Pillow reads in IFD0 (1 when there
    is none; exif_transpose applies it only if in 2..8).

    IFD0 is an entry count, then 12-byte entries (tag, type, value count, then the values when they
    fit in 4 bytes, else their offset). Pillow keeps the entries that fit before the end.
    """
    count = tf.where(valid, tf.minimum(data.uint(ifd, 2, little), (end - ifd - 2) // _IFD_ENTRY_BYTES), 0)
    entries = ifd + 2 + _IFD_ENTRY_BYTES * tf.range(count)
    tags, types = data.uint(entries, 2, little), tf.minimum(data.uint(entries + 2, 2, little), 17)
    sizes = data.uint(entries + 4, 4, little) * tf.gather(tf.constant(_TIFF_TYPE_SIZES, tf.int64), types)
    out_of_line = sizes > 4
    values = tf.where(out_of_line, tiff + data.uint(entries + 8, 4, little), entries + 8)
    read = _entries_pillow_reads(sizes, out_of_line, values, tiff, end)
    widths = tf.gather(tf.constant(_TIFF_INTEGER_WIDTHS, tf.int64), types)
    first_values = tf.where(widths > 0, data.uint(values, widths, little), 0)
    found = tf.boolean_mask(first_values, read & tf.equal(tags, _EXIF_ORIENTATION_TAG))
    return tf.concat([found, [1]], axis=0)[0]


def _entries_pillow_reads(
    sizes: tf.Tensor, out_of_line: tf.Tensor, values: tf.Tensor, tiff: tf.Tensor, end: tf.Tensor
) -> tf.Tensor:
    """bool [entries]: which IFD entries Pillow reads a value from.

    Pillow reads the entries in order: it skips unknown types and empty values; once the
    out-of-line values add up to more than the data holds it skips the rest of them unread; and
    it gives up on the IFD at the first out-of-line value that lies past the end, so a later
    Orientation is never seen. (It also skips a tag repeated after being read; not done here.)
    """
    skipped = out_of_line & (tf.cumsum(tf.where(out_of_line, sizes, 0)) > end - tiff)
    unreadable = out_of_line & ~skipped & (values + sizes > end)
    return (sizes > 0) & ~skipped & ~unreadable & (tf.cumsum(tf.cast(unreadable, tf.int64)) == 0)
