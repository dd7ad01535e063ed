"""Train/serve skew guard: the bytes signature and the gateway's Pillow preprocessing agree on real photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.preprocess import to_model_input

pytestmark = pytest.mark.slow

PHOTOS = 40  # enough real photos to catch a systematic resize difference, few enough to stay fast
UPSCALED = (97, 75)  # odd, non-square, larger than 32x32: both resize passes do real filtering
# Pixel contract: the graph's 32x32 pixels are identical to the gateway's, every value of every
# image at every size. The graph computes Pillow's own fixed-point arithmetic (integer filter
# coefficients, rounding after each pass, Pillow 13's pass order), so any difference at all, even
# one level on one value, is a bug; tests compare with assert_array_equal.
# Probabilities: with identical pixels, serving_bytes and serving_default run the same model on the
# same float32 input, and the largest difference measured is 0.0 (see the report printed by -s).
# 1e-6 leaves a few float32 ulps for two graphs whose kernels might one day add in another order,
# yet fails on a single pixel value one level off: in 20 trials on 40 photos that moved the test
# model's probabilities by 2e-5 per image (median) and by at least 1.4e-5 somewhere in the batch.
PROB_ATOL = 1e-6


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
def session(exported_session):
    return exported_session


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
    np.testing.assert_array_equal(graph, _gateway_pixels(encoded))


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
    np.testing.assert_array_equal(graph, _gateway_pixels([encoded])[0])


# --- Every size: the graph's resize is Pillow's, bit for bit, up- and downscaling, wide and tall ---

# Each side: 1 and 2 (a filter wider than the image), 31 and 33 (scale near 1), 32 (Pillow skips that
# pass), and up- and downscales by awkward factors; all pairs, so tall and wide images both run the
# pass order Pillow 13 picks for them (vertical first when the height shrinks by more than twice
# as many pixels as the width).
GRID_SIDES = (1, 2, 31, 32, 33, 40, 48, 64, 97, 100, 128, 333, 1000)
GRID = [(width, height) for width in GRID_SIDES for height in GRID_SIDES]
# Photo-sized and extreme images: passes over 2**20 pixel values (summed in float32 coefficient
# pieces), many taps per output, and the longest side accepted (MAX_SIDE).
LARGE = [(4032, 3024), (3024, 4032), (1000, 3000), (20000, 60), (65535, 3)]


def _png(pixels: np.ndarray) -> bytes:
    return _encode(Image.fromarray(pixels), "PNG")


def _assert_identical_at_every_size(decode_small, images: dict[tuple[int, int], bytes]) -> None:
    """Compare the graph with the gateway on each (width, height) -> encoded image; report every size
    that differs at once, since the pattern of sizes tells which part of the resize is off."""
    import PIL

    differing = []
    for (width, height), encoded in images.items():
        graph, gateway = decode_small(encoded), _gateway_pixels([encoded])[0]
        if not np.array_equal(graph, gateway):
            diff = np.abs(graph - gateway)
            differing.append(f"{width}x{height}: {np.mean(diff > 0):.2%} of values, up to {diff.max():.0f}")
    assert not differing, (
        f"graph resize differs from Pillow {PIL.__version__} (the graph follows Pillow 13) at "
        f"{len(differing)} of {len(images)} sizes:\n" + "\n".join(differing)
    )


def test_graph_resize_is_pillows_at_every_size_on_noise(graph_decode):
    """Random pixels (no shared/ photos needed): every coefficient and rounding shows."""
    rng = np.random.default_rng(0)
    images = {(w, h): _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in GRID}
    _assert_identical_at_every_size(graph_decode[1], images)


def test_graph_resize_is_pillows_at_every_size_on_photos(graph_decode, cifar_sample):
    """Real photos resized to each size: their smooth areas give many sums on or next to a rounding
    boundary, where only Pillow's own fixed-point weights round the same way (the float resize this
    replaced was one level off on about 3% of values at some sizes)."""
    photos = [Image.open(path).convert("RGB") for path, _ in cifar_sample]
    images = {
        size: _png(np.asarray(photos[i % len(photos)].resize(size, Image.Resampling.BICUBIC)))
        for i, size in enumerate(GRID)
    }
    _assert_identical_at_every_size(graph_decode[1], images)


def test_graph_resize_is_pillows_on_large_images(graph_decode):
    """Smooth synthetic content with grain (no shared/ photos needed), saved as BMP: lossless, quick
    to write at these sizes, and it holds the widest one (JPEG stops at 65,535 pixels a side, libpng
    refuses rows over a million)."""
    rng = np.random.default_rng(1)
    images = {}
    for width, height in LARGE:
        y, x = np.ogrid[0:height, 0:width]
        smooth = np.stack(np.broadcast_arrays(x * 255 // width, y * 255 // height, (x + y) % 256), axis=-1)
        grain = rng.integers(-3, 4, (height, width, 3))  # sensor-like, on top of the gradients
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        images[width, height] = _encode(Image.fromarray(pixels), "BMP")
    _assert_identical_at_every_size(graph_decode[1], images)


# --- EXIF orientation: the graph turns a JPEG upright exactly as the gateway's exif_transpose does ---

ORIENTATION_TAG = 0x0112
BYTE_ORDERS = {"<": "little-endian", ">": "big-endian"}
EXIF_HEADER = b"Exif\x00\x00"  # how an APP1 segment holding EXIF starts


def _marked(image: Image.Image) -> Image.Image:
    """`image` with a red block in its top-left corner, so that each of the 8 orientations of this
    non-square image gives different pixels (a flip of a symmetric photo would prove nothing)."""
    pixels = np.array(image.convert("RGB"))
    pixels[: pixels.shape[0] // 4, : pixels.shape[1] // 3] = (255, 0, 0)
    return Image.fromarray(pixels)


def _exif(orientation: int | None, byte_order: str = "<") -> bytes:
    """An EXIF block as a camera writes it: Orientation among other IFD0 tags (None: no Orientation)."""
    exif = Image.Exif()
    exif.endian = byte_order  # Pillow writes "II" for "<" and "MM" for ">"
    exif[0x010F] = "PhoneMaker"  # Make: an ASCII value stored out of line, before the Orientation entry
    if orientation is not None:
        exif[ORIENTATION_TAG] = orientation
    exif[0x0131] = "parity-test"  # Software, after it
    return exif.tobytes()


def _raw_exif(*entries: bytes, byte_order: str = "<", ifd_offset: int = 8, count: int | None = None) -> bytes:
    """A hand-written EXIF block (IFD0 holding `entries`), for the malformed ones Pillow will not write."""
    endian = "little" if byte_order == "<" else "big"
    magic = b"II*\x00" if byte_order == "<" else b"MM\x00*"
    count = len(entries) if count is None else count
    return (
        EXIF_HEADER + magic + ifd_offset.to_bytes(4, endian) + count.to_bytes(2, endian) + b"".join(entries)
    )


def _entry(tag: int, typ: int, count: int, value: bytes, byte_order: str = "<") -> bytes:
    """One 12-byte IFD entry; `value` is the 4-byte field (the values, or an offset), padded."""
    endian = "little" if byte_order == "<" else "big"
    head = tag.to_bytes(2, endian) + typ.to_bytes(2, endian) + count.to_bytes(4, endian)
    return head + value.ljust(4, b"\0")


def _jpeg(image: Image.Image, exif: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **({} if exif is None else {"exif": exif}))
    return buffer.getvalue()


def _with_segments(jpeg: bytes, *segments: tuple[int, bytes]) -> bytes:
    """`jpeg` (as Pillow writes it: SOI, then JFIF APP0) with (marker, payload) segments inserted after
    the APP0, where cameras and editors place them."""
    assert jpeg[:4] == b"\xff\xd8\xff\xe0"
    after_app0 = 4 + int.from_bytes(jpeg[4:6], "big")
    inserted = b"".join(
        bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload
        for marker, payload in segments
    )
    return jpeg[:after_app0] + inserted + jpeg[after_app0:]


def _gateway_decoded(encoded: bytes) -> np.ndarray:
    """Full-size RGB pixels of the gateway's decode (EXIF orientation applied), before the resize."""
    from serving.images import decode_image

    return np.asarray(decode_image(encoded, filename="photo", max_pixels=10**8), dtype=np.float32)


def _same_image(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


@pytest.fixture(scope="module")
def graph_decode():
    """decode_rgb (full size) and decode_and_resize (32x32) traced as graphs, as the SavedModel runs
    them (tf.cond, while loop, switch), each taking one encoded image."""
    import tensorflow as tf

    from trainer.export.savedmodel import decode_and_resize, decode_rgb

    spec = [tf.TensorSpec([], tf.string)]
    full = tf.function(decode_rgb, input_signature=spec)
    small = tf.function(decode_and_resize, input_signature=spec)
    return (lambda b: full(tf.constant(b)).numpy()), (lambda b: small(tf.constant(b)).numpy())


@pytest.fixture(scope="module")
def oriented_photos(cifar_sample) -> dict[tuple[int, str], bytes]:
    """One real photo, 97x75 and marked, saved as JPEG with each Orientation 1..8 in both byte orders."""
    photo = Image.open(cifar_sample[7][0]).convert("RGB").resize(UPSCALED, Image.Resampling.BICUBIC)
    return {(k, order): _jpeg(_marked(photo), _exif(k, order)) for k in range(1, 9) for order in BYTE_ORDERS}


@pytest.mark.parametrize("byte_order", list(BYTE_ORDERS), ids=list(BYTE_ORDERS.values()))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_graph_applies_exif_orientation_like_the_gateway(
    oriented_photos, graph_decode, orientation, byte_order
):
    decode_full, decode_small = graph_decode
    encoded = oriented_photos[orientation, byte_order]
    gateway = _gateway_decoded(encoded)
    # The case means something: the gateway did turn the image (all but orientation 1).
    assert (orientation == 1) == _same_image(gateway, _gateway_decoded(oriented_photos[1, byte_order]))

    # Before the resize the pixels are identical: decoding (accurate IDCT) and transposing are exact.
    full = decode_full(encoded)
    assert full.shape == gateway.shape
    np.testing.assert_array_equal(full, gateway)
    # After it, the pixel contract of the parity tests above: identical.
    np.testing.assert_array_equal(decode_small(encoded), _gateway_pixels([encoded])[0])


def test_bytes_signatures_classify_oriented_jpegs_like_the_gateway(session, oriented_photos):
    """What TF Serving answers for a phone photo equals the pixel signature on the gateway's pixels."""
    encoded = np.array(list(oriented_photos.values()), dtype=object)
    expected = session.run("serving_default", {"images": _gateway_pixels(list(encoded))})["probabilities"]
    via_bytes = session.run("serving_bytes", {"image_bytes": encoded})["probabilities"]
    print(f"\noriented JPEGs: max probability diff {np.abs(via_bytes - expected).max():.2e}")
    np.testing.assert_array_equal(via_bytes.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(via_bytes, expected, atol=PROB_ATOL, rtol=0)
    # explain_bytes decodes with the same function: its scores follow the upright image too.
    top_class = np.full(len(encoded), -1, dtype=np.int32)
    explained = session.run("explain_bytes", {"image_bytes": encoded, "class_index": top_class})
    np.testing.assert_allclose(explained["probabilities"], expected, atol=PROB_ATOL, rtol=0)


# Pillow warns (UserWarning) about each defect it meets in the hand-made and damaged blocks below.
PILLOW_EXIF_WARNINGS = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")
ORIENTATION_6 = _entry(ORIENTATION_TAG, 3, 1, b"\x06\x00")  # little-endian SHORT 6
# EXIF blocks that must leave the image as decoded (Pillow's orientation 1): no transpose, no error.
UNUSABLE_EXIF = {
    "garbage_after_marker": EXIF_HEADER + bytes(range(7, 250, 3)),
    "marker_only": EXIF_HEADER,
    "truncated_header": EXIF_HEADER + b"II*\x00\x08",
    "truncated_ifd": _raw_exif(ORIENTATION_6[:7], count=3),
    "truncated_count": _raw_exif()[:-1],
    "ifd_offset_past_the_end": _raw_exif(ORIENTATION_6, ifd_offset=4000),
    "ifd_offset_overflowing": _raw_exif(ORIENTATION_6, ifd_offset=2**32 - 1),
    "bad_byte_order_mark": EXIF_HEADER + b"IM" + _raw_exif(ORIENTATION_6)[8:],
    "orientation_0": _exif(0),
    "orientation_9": _exif(9),
    "orientation_0xffff": _exif(0xFFFF, ">"),
    "orientation_as_ascii": _raw_exif(_entry(ORIENTATION_TAG, 2, 2, b"6\x00")),
    # Pillow stops reading IFD0 at an entry whose out-of-line value lies past the end of the block.
    "orientation_after_unreadable_entry": _raw_exif(_entry(0x010F, 2, 20, b"\x00\x10"), ORIENTATION_6),
    "no_orientation_tag": _exif(None),
}


@pytest.fixture(scope="module")
def plain_photo() -> Image.Image:
    """A synthetic non-square picture (needs no shared/ photos), marked like the real ones."""
    y, x = np.mgrid[0:40, 0:48]
    return _marked(Image.fromarray(np.stack([x * 5, y * 6, (x * y) % 256], axis=-1).astype(np.uint8)))


@PILLOW_EXIF_WARNINGS
@pytest.mark.parametrize("case", list(UNUSABLE_EXIF))
def test_unusable_exif_leaves_the_image_as_decoded(plain_photo, graph_decode, case):
    decode_full, decode_small = graph_decode
    plain = _jpeg(plain_photo)
    encoded = _with_segments(plain, (0xE1, UNUSABLE_EXIF[case]))
    np.testing.assert_array_equal(decode_full(encoded), decode_full(plain))
    np.testing.assert_array_equal(decode_small(encoded), decode_small(plain))
    np.testing.assert_array_equal(decode_full(encoded), _gateway_decoded(encoded))  # as Pillow does


def test_unusable_exif_does_not_fail_the_bytes_signature(session, plain_photo):
    plain = _jpeg(plain_photo)
    encoded = [plain] + [_with_segments(plain, (0xE1, block)) for block in UNUSABLE_EXIF.values()]
    out = session.run("serving_bytes", {"image_bytes": np.array(encoded, dtype=object)})["probabilities"]
    np.testing.assert_allclose(out, np.repeat(out[:1], len(encoded), axis=0), atol=1e-6, rtol=0)


# Segment layouts where the EXIF block must be found (and its orientation applied) as Pillow does.
EXIF_LAYOUTS = {
    # Exif-looking bytes inside a comment are not the APP1 segment: orientation 3 applies, not 6.
    "fake_exif_in_comment": ((0xFE, b"\xff\xe1\x00\x20" + _exif(6, ">")), (0xE1, _exif(3, ">"))),
    # Another APP1 (XMP, without orientation) before the EXIF one.
    "xmp_before_exif": ((0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"), (0xE1, _exif(8))),
    # Only the first EXIF segment counts.
    "two_exif_segments": ((0xE1, _exif(5)), (0xE1, _exif(7))),
    # Some writers repeat the header; Pillow drops both.
    "doubled_exif_header": ((0xE1, EXIF_HEADER + _exif(6)),),
    # The magic 42 in the other byte order, which Pillow accepts.
    "swapped_magic": ((0xE1, EXIF_HEADER + b"II\x00*" + _exif(2)[10:]),),
    # A SHORT Orientation with 2 values, or a LONG one: Pillow takes the first value.
    "two_shorts": ((0xE1, _raw_exif(_entry(ORIENTATION_TAG, 3, 2, b"\x06\x00\x01\x00"))),),
    "long": ((0xE1, _raw_exif(_entry(ORIENTATION_TAG, 4, 1, b"\0\0\0\x08", ">"), byte_order=">")),),
}


@PILLOW_EXIF_WARNINGS
@pytest.mark.parametrize("case", list(EXIF_LAYOUTS))
def test_exif_is_found_where_pillow_finds_it(plain_photo, graph_decode, case):
    decode_full, _ = graph_decode
    plain = _jpeg(plain_photo)
    encoded = _with_segments(plain, *EXIF_LAYOUTS[case])
    gateway = _gateway_decoded(encoded)
    assert not _same_image(gateway, decode_full(plain))  # the gateway did turn it
    np.testing.assert_array_equal(decode_full(encoded), gateway)


@PILLOW_EXIF_WARNINGS
def test_graph_orientation_matches_pillow_on_randomly_damaged_exif(plain_photo, graph_decode):
    """Fuzz: byte flips and cuts in camera-like EXIF blocks. The graph must never fail, and must
    orient as Pillow does whenever the gateway accepts the file."""
    import random

    from serving.errors import GatewayError

    decode_full, _ = graph_decode
    plain = _jpeg(plain_photo.resize((12, 10)))
    as_decoded = decode_full(plain)
    rng = random.Random(0)
    turned = 0
    for _ in range(150):
        exif = bytearray(_exif(rng.randint(0, 10), rng.choice("<>")))
        for _ in range(rng.randint(0, 3)):
            exif[rng.randrange(6, len(exif))] = rng.randrange(256)
        if rng.random() < 0.3:
            del exif[rng.randrange(6, len(exif)) :]
        encoded = _with_segments(plain, (0xE1, bytes(exif)))
        graph = decode_full(encoded)
        try:
            expected = _gateway_decoded(encoded)
        except GatewayError:  # the gateway refuses some broken blocks; the graph keeps the image as is
            expected = as_decoded
        np.testing.assert_array_equal(graph, expected, err_msg=bytes(exif).hex())
        turned += not _same_image(graph, as_decoded)
    assert turned > 30  # the orientation path is exercised, not only the fallback


def test_a_side_over_the_limit_is_refused_by_both_paths(session):
    """Both refuse a side over MAX_SIDE (the graph's resize would need a [32, side] weight matrix);
    both accept MAX_SIDE itself (test_graph_resize_is_pillows_on_large_images)."""
    import tensorflow as tf

    from serving.errors import GatewayError
    from serving.images import decode_image
    from trainer.export.savedmodel import MAX_SIDE

    too_wide = _encode(Image.new("RGB", (MAX_SIDE + 1, 1), (9, 99, 199)), "BMP")
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"image side over {MAX_SIDE} pixels"):
        session.run("serving_bytes", {"image_bytes": np.array([too_wide], dtype=object)})
    with pytest.raises(GatewayError) as refused:
        decode_image(too_wide, filename="wide.bmp", max_pixels=10**8)
    assert (refused.value.status, refused.value.code) == (413, "image_side_too_long")
