"""benchmarks/photo_decode.py measures what it says: camera-sized JPEGs, the whole decode beside the
reduced one every path now runs, how far apart they leave the model's pixels, and one decode's memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import photo_decode as bench


@pytest.fixture(scope="module")
def pictures() -> list:
    return bench.source_pictures(2)[0]


def test_the_photos_are_camera_sized_jpegs(pictures) -> None:
    """Noise keeps the files as large as a camera's: a smooth upscale would decode unrealistically fast."""
    noisy = bench.photo_jpeg(pictures[0], (1920, 1080), seed=0)
    assert noisy[:2] == b"\xff\xd8"
    assert len(noisy) > 200 * 1024  # a 1080p photo from a phone is several hundred KiB


def test_both_ways_give_the_models_pixels_a_level_or_two_apart(pictures) -> None:
    data = bench.photo_jpeg(pictures[1], (1920, 1080), seed=1)
    whole, reduced = bench.whole(data), bench.reduced(data)
    assert whole.shape == reduced.shape == (32, 32, 3)
    assert np.abs(whole.astype(int) - reduced.astype(int)).max() <= 2


def test_decode_rows_name_the_scale_and_the_speed_up(pictures, monkeypatch) -> None:
    monkeypatch.setattr(bench, "SIZES", {"small": (200, 150), "1080p": (1920, 1080)})
    photos = {name: [bench.photo_jpeg(p, size, 0) for p in pictures] for name, size in bench.SIZES.items()}
    rows = {row["photo"]: row for row in bench.measure_decode(photos, repeats=1)}
    assert rows["small"]["scale"] == "1/1" and rows["1080p"]["scale"] == "1/8"
    assert rows["small"]["max_pixel_difference"] == 0  # decoded whole either way
    assert rows["1080p"]["speedup"] == rows["1080p"]["whole_ms"] / rows["1080p"]["reduced_ms"]
    assert rows["1080p"]["photos"] == 2 and rows["1080p"]["mean_file_kib"] > 0


def test_one_decodes_memory_is_measured_in_a_fresh_process(pictures, tmp_path: Path) -> None:
    """Whole, a 2048x1536 JPEG holds 12 MiB of RGB (Pillow: 4 bytes a pixel); reduced to 1/8, 0.2 MiB."""
    photo, small = tmp_path / "photo.jpg", tmp_path / "small.jpg"
    photo.write_bytes(bench.photo_jpeg(pictures[0], (2048, 1536), seed=0))
    small.write_bytes(bench.photo_jpeg(pictures[0], (320, 240), seed=0))
    rise = bench.measure_memory(photo, small)
    assert rise["whole_mib"] >= 10 and rise["reduced_mib"] < rise["whole_mib"] / 4, rise


def test_the_folder_is_read_on_one_thread_and_on_one_per_cpu(pictures, tmp_path: Path) -> None:
    photos = [bench.photo_jpeg(p, (400, 300), seed=i) for i, p in enumerate(pictures)]
    row = bench.measure_folder(photos, tmp_path / "folder", repeats=1)
    assert row["files"] == 4 * len(photos) == len(list((tmp_path / "folder").rglob("*.jpg")))
    assert row["threads"] >= 1 and row["speedup"] == row["one_thread_s"] / row["threads_s"]
