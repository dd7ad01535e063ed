"""Fixtures the in-graph image codec tests share (tests/trainer/graph_image_cases.py builds them)."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.trainer.graph_image_cases import orientation_jpegs, synthetic_photo


@pytest.fixture(scope="module")
def oriented_photos(cifar_sample) -> dict[tuple[int, str], bytes]:
    """Real photos as JPEGs carrying each EXIF orientation, keyed by (orientation, byte order)."""
    return orientation_jpegs(cifar_sample)


@pytest.fixture(scope="module")
def plain_photo() -> Image.Image:
    return synthetic_photo()
