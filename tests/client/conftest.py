"""Images the client tests send: real CIFAR-10 photos, plus larger JPEG re-encodings of some of them
so the resize and the JPEG decode of both prediction paths are exercised, not only 32x32 PNGs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def sample_images(cifar_sample, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six 32x32 PNGs from the sample and three of them as 96x80 JPEGs (written once per session)."""
    pngs = [path for path, _ in cifar_sample[:6]]
    out = tmp_path_factory.mktemp("client-images")
    jpegs = []
    for path in pngs[:3]:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").resize((96, 80), Image.Resampling.BICUBIC).save(
            buffer, "JPEG", quality=92
        )
        target = out / f"{path.stem}-large.jpg"
        target.write_bytes(buffer.getvalue())
        jpegs.append(target)
    return pngs + jpegs
