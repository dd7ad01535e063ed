"""Images, EXIF blocks and the gateway's pixels shared by the graph image codec tests
(test_graph_image_*.py) and the bytes-signature parity tests (test_export_parity.py).

The gateway's side is its own upload decoding (serving/images.py) and the shared resize
(contract/preprocess.py); the graph's side is trainer/export/graph_image/, traced as the SavedModel runs it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from contract.preprocess import to_model_input

PHOTOS = 40  # enough real photos to catch a systematic resize difference, few enough to stay fast
UPSCALED = (97, 75)  # odd, non-square, larger than 32x32: both resize passes do real filtering

Decoder = Callable[[bytes], np.ndarray]


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels), "PNG")


def upscaled_photos(cifar_sample: list[tuple[Path, str]]) -> list[Image.Image]:
    """The real CIFAR-10 photos upscaled to UPSCALED."""
    return [
        Image.open(path).convert("RGB").resize(UPSCALED, Image.Resampling.BICUBIC) for path, _ in cifar_sample
    ]


def encode_photos(cifar_sample: list[tuple[Path, str]]) -> dict[str, list[bytes]]:
    """PHOTOS real CIFAR-10 photos upscaled to 97x75 and saved as JPEG, PNG, GIF and BMP."""
    photos = upscaled_photos(cifar_sample)
    return {fmt: [encode(p, fmt) for p in photos[:PHOTOS]] for fmt in ("JPEG", "PNG", "GIF", "BMP")}


def gateway_pixels(encoded: list[bytes]) -> np.ndarray:
    """The pixels the gateway feeds the model: its own upload decoding, then the shared resize."""
    from serving.images import decode_image

    return np.stack(
        [to_model_input(decode_image(b, filename="photo", max_pixels=10**8)) for b in encoded]
    ).astype(np.float32)


def gateway_decoded(encoded: bytes) -> np.ndarray:
    """Full-size RGB pixels of the gateway's decode (EXIF orientation applied), before the resize."""
    from serving.images import decode_image

    return np.asarray(decode_image(encoded, filename="photo", max_pixels=10**8), dtype=np.float32)


def traced_decoders() -> tuple[Decoder, Decoder]:
    """decode_rgb (full size) and decode_and_resize (32x32) traced as graphs, as the SavedModel runs
    them (tf.cond, while loop, switch), each taking one encoded image."""
    import tensorflow as tf

    from trainer.export.graph_image.decode import decode_and_resize, decode_rgb

    spec = [tf.TensorSpec([], tf.string)]
    full = tf.function(decode_rgb, input_signature=spec)
    small = tf.function(decode_and_resize, input_signature=spec)
    return (lambda b: full(tf.constant(b)).numpy()), (lambda b: small(tf.constant(b)).numpy())


# --- EXIF ------------------------------------------------------------------------------------------

ORIENTATION_TAG = 0x0112
BYTE_ORDERS = {"<": "little-endian", ">": "big-endian"}
EXIF_HEADER = b"Exif\x00\x00"  # how an APP1 segment holding EXIF starts


def marked(image: Image.Image) -> Image.Image:
    """`image` with a red block in its top-left corner, so that each of the 8 orientations of this
    non-square image gives different pixels (a flip of a symmetric photo would prove nothing)."""
    pixels = np.array(image.convert("RGB"))
    pixels[: pixels.shape[0] // 4, : pixels.shape[1] // 3] = (255, 0, 0)
    return Image.fromarray(pixels)


def exif_block(orientation: int | None, byte_order: str = "<") -> bytes:
    """An EXIF block as a camera writes it: Orientation among other IFD0 tags (None: no Orientation)."""
    exif = Image.Exif()
    exif.endian = byte_order  # Pillow writes "II" for "<" and "MM" for ">"
    exif[0x010F] = "PhoneMaker"  # Make: an ASCII value stored out of line, before the Orientation entry
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    exif[0x0131] = "parity-test"  # Software, after it
    return exif.tobytes()


def raw_exif(*entries: bytes, byte_order: str = "<", ifd_offset: int = 8, count: int | None = None) -> bytes:
    """A hand-written EXIF block (IFD0 holding `entries`), for the malformed ones Pillow will not write."""
    endian = "little" if byte_order == "<" else "big"
    magic = b"II*\x00" if byte_order == "<" else b"MM\x00*"
    count = len(entries) if count is None else count
    return (
        EXIF_HEADER + magic + ifd_offset.to_bytes(4, endian) + count.to_bytes(2, endian) + b"".join(entries)
    )


def ifd_entry(tag: int, typ: int, count: int, value: bytes, byte_order: str = "<") -> bytes:
    """One 12-byte IFD entry; `value` is the 4-byte field (the values, or an offset), padded."""
    endian = "little" if byte_order == "<" else "big"
    head = tag.to_bytes(2, endian) + typ.to_bytes(2, endian) + count.to_bytes(4, endian)
    return head + value.ljust(4, b"\0")


def jpeg(image: Image.Image, exif: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **({} if exif is None else {"exif": exif}))
    return buffer.getvalue()


def with_segments(encoded: bytes, *segments: tuple[int, bytes]) -> bytes:
    """A JPEG (`encoded` as Pillow writes it: SOI, then JFIF APP0) with (marker, payload) segments
    inserted after the APP0, where cameras and editors place them."""
    assert encoded[:4] == b"\xff\xd8\xff\xe0"
    after_app0 = 4 + int.from_bytes(encoded[4:6], "big")
    inserted = b"".join(
        bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload
        for marker, payload in segments
    )
    return encoded[:after_app0] + inserted + encoded[after_app0:]


def orientation_jpegs(cifar_sample: list[tuple[Path, str]]) -> dict[tuple[int, str], bytes]:
    """One real photo, 97x75 and marked, saved as JPEG with each Orientation 1..8 in both byte orders."""
    photo = Image.open(cifar_sample[7][0]).convert("RGB").resize(UPSCALED, Image.Resampling.BICUBIC)
    return {
        (k, order): jpeg(marked(photo), exif_block(k, order)) for k in range(1, 9) for order in BYTE_ORDERS
    }


def synthetic_photo() -> Image.Image:
    """A synthetic non-square picture (needs no shared/ photos), marked like the real ones."""
    y, x = np.mgrid[0:40, 0:48]
    return marked(Image.fromarray(np.stack([x * 5, y * 6, (x * y) % 256], axis=-1).astype(np.uint8)))


ORIENTATION_6 = ifd_entry(ORIENTATION_TAG, 3, 1, b"\x06\x00")  # little-endian SHORT 6
# EXIF blocks that must leave the image as decoded (Pillow's orientation 1): no transpose, no error.
UNUSABLE_EXIF = {
    "garbage_after_marker": EXIF_HEADER + bytes(range(7, 250, 3)),
    "marker_only": EXIF_HEADER,
    "truncated_header": EXIF_HEADER + b"II*\x00\x08",
    "truncated_ifd": raw_exif(ORIENTATION_6[:7], count=3),
    "truncated_count": raw_exif()[:-1],
    "ifd_offset_past_the_end": raw_exif(ORIENTATION_6, ifd_offset=4000),
    "ifd_offset_overflowing": raw_exif(ORIENTATION_6, ifd_offset=2**32 - 1),
    "bad_byte_order_mark": EXIF_HEADER + b"IM" + raw_exif(ORIENTATION_6)[8:],
    "orientation_0": exif_block(0),
    "orientation_9": exif_block(9),
    "orientation_0xffff": exif_block(0xFFFF, ">"),
    "orientation_as_ascii": raw_exif(ifd_entry(ORIENTATION_TAG, 2, 2, b"6\x00")),
    # Pillow stops reading IFD0 at an entry whose out-of-line value lies past the end of the block.
    "orientation_after_unreadable_entry": raw_exif(ifd_entry(0x010F, 2, 20, b"\x00\x10"), ORIENTATION_6),
    "no_orientation_tag": exif_block(None),
}


def large_jpeg(size: tuple[int, int], kind: str) -> bytes:
    """A photo-like picture (the marked synthetic one, upscaled, with sensor-like noise) as a JPEG of
    `kind`: 420 (chroma subsampled, as cameras save), 444, progressive, grayscale, or oriented (EXIF
    Orientation 6). Large enough ones decode at a reduced scale (contract/preprocess.py)."""
    rng = np.random.default_rng(size[0] * 7 + size[1])
    pixels = np.asarray(synthetic_photo().resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    image = Image.fromarray(np.clip(pixels + rng.integers(-8, 9, pixels.shape), 0, 255).astype(np.uint8))
    options = {
        "420": {},
        "444": {"subsampling": 0},
        "progressive": {"progressive": True},
        "grayscale": {},
        "oriented": {"exif": exif_block(6)},
    }[kind]
    if kind == "grayscale":
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()

