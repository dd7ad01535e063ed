"""trainer/export/graph_image/pillow_resize.py: the graph's resize is Pillow's, bit for bit, at every
size, up- and downscaling, wide and tall (lossless encodings, so only the resize can differ).

The graph computes Pillow's own fixed-point arithmetic (integer filter coefficients, rounding after
each pass, Pillow 13's pass order), so any difference at all, even one level on one value, is a bug.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from contract.signatures import MAX_SIDE
from tests.trainer.graph_image_cases import Decoder, encode, gateway_pixels, png, traced_decoders

pytestmark = pytest.mark.slow

# Each side: 1 and 2 (a filter wider than the image), 31 and 33 (scale near 1), 32 (Pillow skips that
# pass), and up- and downscales by awkward factors; all pairs, so tall and wide images both run the
# pass order Pillow 13 picks for them (vertical first when the height shrinks by more than twice
# as many pixels as the width).
GRID_SIDES = (1, 2, 31, 32, 33, 40, 48, 64, 97, 100, 128, 333, 1000)
GRID = [(width, height) for width in GRID_SIDES for height in GRID_SIDES]
# Photo-sized and extreme images: passes over 2**20 pixel values (summed in float32 coefficient
# pieces), many taps per output, and the longest side accepted (MAX_SIDE).
LARGE = [(4032, 3024), (3024, 4032), (1000, 3000), (20000, 60), (MAX_SIDE, 3)]


@pytest.fixture(scope="module")
def decode_small() -> Decoder:
    """decode_and_resize traced as a graph, as the SavedModel runs it."""
    return traced_decoders()[1]


def _assert_identical_at_every_size(decode_small: Decoder, images: dict[tuple[int, int], bytes]) -> None:
    """Compare the graph with the gateway on each (width, height) -> encoded image; report every size
    that differs at once, since the pattern of sizes tells which part of the resize is off."""
    import PIL

    differing = []
    for (width, height), encoded in images.items():
        graph, gateway = decode_small(encoded), gateway_pixels([encoded])[0]
        if not np.array_equal(graph, gateway):
            diff = np.abs(graph - gateway)
            differing.append(f"{width}x{height}: {np.mean(diff > 0):.2%} of values, up to {diff.max():.0f}")
    assert not differing, (
        f"graph resize differs from Pillow {PIL.__version__} (the graph follows Pillow 13) at "
        f"{len(differing)} of {len(images)} sizes:\n" + "\n".join(differing)
    )


def test_graph_resize_is_pillows_at_every_size_on_noise(decode_small):
    """Random pixels (no shared/ photos needed): every coefficient and rounding shows."""
    rng = np.random.default_rng(0)
    images = {(w, h): png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in GRID}
    _assert_identical_at_every_size(decode_small, images)


def test_graph_resize_is_pillows_at_every_size_on_photos(decode_small, cifar_sample):
    """Real photos resized to each size: their smooth areas give many sums on or next to a rounding
    boundary, where only Pillow's own fixed-point weights round the same way (the float resize this
    replaced was one level off on about 3% of values at some sizes)."""
    photos = [Image.open(path).convert("RGB") for path, _ in cifar_sample]
    images = {
        size: png(np.asarray(photos[i % len(photos)].resize(size, Image.Resampling.BICUBIC)))
        for i, size in enumerate(GRID)
    }
    _assert_identical_at_every_size(decode_small, images)


def test_graph_resize_is_pillows_on_large_images(decode_small):
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
        images[width, height] = encode(Image.fromarray(pixels), "BMP")
    _assert_identical_at_every_size(decode_small, images)
