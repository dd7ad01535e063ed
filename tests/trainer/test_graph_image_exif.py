"""trainer/export/graph_image/exif.py: the graph turns a JPEG upright exactly as the gateway's
`exif_transpose` does, finds the EXIF block where Pillow finds it, and leaves an image whose EXIF it
cannot use as decoded, never failing on it."""

from __future__ import annotations

import numpy as np
import pytest

from tests.trainer.graph_image_cases import (
    BYTE_ORDERS,
    EXIF_HEADER,
    ORIENTATION_TAG,
    UNUSABLE_EXIF,
    Decoder,
    exif_block,
    gateway_decoded,
    gateway_pixels,
    ifd_entry,
    jpeg,
    raw_exif,
    traced_decoders,
    with_segments,
)

pytestmark = pytest.mark.slow

# Pillow warns (UserWarning) about each defect it meets in the hand-made and damaged blocks below.
PILLOW_EXIF_WARNINGS = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")


@pytest.fixture(scope="module")
def graph_decode() -> tuple[Decoder, Decoder]:
    return traced_decoders()


def _same_image(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("byte_order", list(BYTE_ORDERS), ids=list(BYTE_ORDERS.values()))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_graph_applies_exif_orientation_like_the_gateway(
    oriented_photos, graph_decode, orientation, byte_order
):
    decode_full, decode_small = graph_decode
    encoded = oriented_photos[orientation, byte_order]
    gateway = gateway_decoded(encoded)
    # The case means something: the gateway did turn the image (all but orientation 1).
    assert (orientation == 1) == _same_image(gateway, gateway_decoded(oriented_photos[1, byte_order]))

    # Before the resize the pixels are identical: decoding (accurate IDCT) and transposing are exact.
    full = decode_full(encoded)
    assert full.shape == gateway.shape
    np.testing.assert_array_equal(full, gateway)
    # After it, the pixel contract of the resize tests: identical.
    np.testing.assert_array_equal(decode_small(encoded), gateway_pixels([encoded])[0])


@PILLOW_EXIF_WARNINGS
@pytest.mark.parametrize("case", list(UNUSABLE_EXIF))
def test_unusable_exif_leaves_the_image_as_decoded(plain_photo, graph_decode, case):
    decode_full, decode_small = graph_decode
    plain = jpeg(plain_photo)
    encoded = with_segments(plain, (0xE1, UNUSABLE_EXIF[case]))
    np.testing.assert_array_equal(decode_full(encoded), decode_full(plain))
    np.testing.assert_array_equal(decode_small(encoded), decode_small(plain))
    np.testing.assert_array_equal(decode_full(encoded), gateway_decoded(encoded))  # as Pillow does


# Segment layouts where the EXIF block must be found (and its orientation applied) as Pillow does.
EXIF_LAYOUTS = {
    # Exif-looking bytes inside a comment are not the APP1 segment: orientation 3 applies, not 6.
    "fake_exif_in_comment": ((0xFE, b"\xff\xe1\x00\x20" + exif_block(6, ">")), (0xE1, exif_block(3, ">"))),
    # Another APP1 (XMP, without orientation) before the EXIF one.
    "xmp_before_exif": ((0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"), (0xE1, exif_block(8))),
    # Only the first EXIF segment counts.
    "two_exif_segments": ((0xE1, exif_block(5)), (0xE1, exif_block(7))),
    # Some writers repeat the header; Pillow drops both.
    "doubled_exif_header": ((0xE1, EXIF_HEADER + exif_block(6)),),
    # The magic 42 in the other byte order, which Pillow accepts.
    "swapped_magic": ((0xE1, EXIF_HEADER + b"II\x00*" + exif_block(2)[10:]),),
    # A SHORT Orientation with 2 values, or a LONG one: Pillow takes the first value.
    "two_shorts": ((0xE1, raw_exif(ifd_entry(ORIENTATION_TAG, 3, 2, b"\x06\x00\x01\x00"))),),
    "long": ((0xE1, raw_exif(ifd_entry(ORIENTATION_TAG, 4, 1, b"\0\0\0\x08", ">"), byte_order=">")),),
}


@PILLOW_EXIF_WARNINGS
@pytest.mark.parametrize("case", list(EXIF_LAYOUTS))
def test_exif_is_found_where_pillow_finds_it(plain_photo, graph_decode, case):
    decode_full, _ = graph_decode
    plain = jpeg(plain_photo)
    encoded = with_segments(plain, *EXIF_LAYOUTS[case])
    gateway = gateway_decoded(encoded)
    assert not _same_image(gateway, decode_full(plain))  # the gateway did turn it
    np.testing.assert_array_equal(decode_full(encoded), gateway)


@PILLOW_EXIF_WARNINGS
def test_graph_orientation_matches_pillow_on_randomly_damaged_exif(plain_photo, graph_decode):
    """Fuzz: byte flips and cuts in camera-like EXIF blocks. The graph must never fail, and must
    orient as Pillow does whenever the gateway accepts the file."""
    import random

    from serving.errors import GatewayError

    decode_full, _ = graph_decode
    plain = jpeg(plain_photo.resize((12, 10)))
    as_decoded = decode_full(plain)
    rng = random.Random(0)
    turned = 0
    for _ in range(150):
        exif = bytearray(exif_block(rng.randint(0, 10), rng.choice("<>")))
        for _ in range(rng.randint(0, 3)):
            exif[rng.randrange(6, len(exif))] = rng.randrange(256)
        if rng.random() < 0.3:
            del exif[rng.randrange(6, len(exif)) :]
        encoded = with_segments(plain, (0xE1, bytes(exif)))
        graph = decode_full(encoded)
        try:
            expected = gateway_decoded(encoded)
        except GatewayError:  # the gateway refuses some broken blocks; the graph keeps the image as is
            expected = as_decoded
        np.testing.assert_array_equal(graph, expected, err_msg=bytes(exif).hex())
        turned += not _same_image(graph, as_decoded)
    assert turned > 30  # the orientation path is exercised, not only the fallback
