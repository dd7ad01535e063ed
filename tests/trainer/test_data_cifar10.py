"""CIFAR-10 loading: the official binary layout bit for bit, the download against a local HTTP
server (good, wrong MD5, truncated, server error, resume, cache), damaged files, and the python
format through the restricted unpickler."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.data import (
    CIFAR10_CLASSES,
    ArchiveServer,
    GeneratedCifar,
    binary_records,
    generate_official_archive,
    python2_pickle,
    python_batch_bytes,
)
from trainer.data import DataError, load_dataset
from trainer.data.cifar10 import ARCHIVE_NAME
from trainer.data.cifar10 import load as load_cifar10
from trainer.data.cifar10_binary import decode_records, encode_records
from trainer.data.cifar10_pickle import decode_batch, restricted_loads

NAME = "cifar-10-binary.tar.gz"


def assert_same_as_generated(raw, generated: GeneratedCifar) -> None:
    assert raw.class_names == CIFAR10_CLASSES
    assert raw.x_train.dtype == np.uint8 and raw.x_train.shape == generated.x_train.shape
    np.testing.assert_array_equal(raw.x_train, generated.x_train)
    np.testing.assert_array_equal(raw.y_train, generated.y_train)
    np.testing.assert_array_equal(raw.x_test, generated.x_test)
    np.testing.assert_array_equal(raw.y_test, generated.y_test)


def leftovers(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir()} - {ARCHIVE_NAME + ".lock"} if cache.exists() else set()


# --- the binary format --------------------------------------------------------------------------


def test_channel_order_is_red_green_blue_row_by_row() -> None:
    # One hand-built record: label 7, red plane 0..1023 mod 256, green all 200, blue all 3.
    red = (np.arange(1024) % 256).astype(np.uint8)
    record = bytes([7]) + red.tobytes() + bytes([200]) * 1024 + bytes([3]) * 1024
    x, y = decode_records(record, "hand-built", num_classes=10)
    assert y.tolist() == [7]
    assert x.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(x[0, :, :, 0], red.reshape(32, 32))  # row-major: x[0, 0, 31] = 31
    assert x[0, 0, 31, 0] == 31 and x[0, 1, 0, 0] == 32
    assert (x[0, :, :, 1] == 200).all() and (x[0, :, :, 2] == 3).all()


def test_encoder_matches_independent_record_writer() -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 9, 4, 2])
    assert encode_records(x, y) == binary_records(x, y)


def test_archive_given_as_data_dir_loads_bit_exactly(official_archive: GeneratedCifar) -> None:
    assert_same_as_generated(load_cifar10(data_dir=official_archive.path), official_archive)
    # The folder holding the archive works too.
    assert_same_as_generated(load_cifar10(data_dir=official_archive.path.parent), official_archive)


def test_extracted_binary_folder_loads_bit_exactly(official_archive: GeneratedCifar, tmp_path: Path) -> None:
    with tarfile.open(official_archive.path) as tar:
        tar.extractall(tmp_path, filter="data")
    assert_same_as_generated(load_cifar10(data_dir=tmp_path), official_archive)
    assert_same_as_generated(load_cifar10(data_dir=tmp_path / "cifar-10-batches-bin"), official_archive)


def test_real_photo_packed_into_a_record_reads_back_identically(cifar_sample, tmp_path: Path) -> None:
    photos = cifar_sample[:10]
    x = np.stack([np.asarray(Image.open(path).convert("RGB")) for path, _ in photos])
    y = np.array([CIFAR10_CLASSES.index(label) for _, label in photos])
    decoded_x, decoded_y = decode_records(binary_records(x, y), "photos", num_classes=10)
    np.testing.assert_array_equal(decoded_x, x)
    np.testing.assert_array_equal(decoded_y, y)
    # And through a whole archive in the official layout, as load_dataset sees it.
    xt, yt = np.concatenate([x] * 5), np.concatenate([y] * 5)
    archive = generate_official_archive(tmp_path / NAME, arrays=(xt, yt, x, y))
    dataset = load_dataset("cifar10", data_dir=archive.path, val_fraction=0.0)
    np.testing.assert_array_equal(dataset.x_test, x)
    assert [dataset.class_names[i] for i in dataset.y_test] == [label for _, label in photos]


def test_load_dataset_carves_validation_and_describes_the_source(official_archive: GeneratedCifar) -> None:
    d = load_dataset("cifar10", data_dir=official_archive.path, val_fraction=0.2, seed=1)
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (80, 20, 20)
    assert not d.synthetic and d.source == str(official_archive.path) and d.notes["format"] == "binary"
    assert d.y_train.dtype == np.int32 and d.x_val.dtype == np.uint8
    # Every training/validation image is one of the generated training images, none lost.
    all_train = np.concatenate([d.x_train, d.x_val]).reshape(100, -1)
    assert sorted(map(bytes, all_train)) == sorted(map(bytes, official_archive.x_train.reshape(100, -1)))


def test_record_size_not_a_multiple_names_the_file(official_archive: GeneratedCifar, tmp_path: Path) -> None:
    with tarfile.open(official_archive.path) as tar:
        tar.extractall(tmp_path, filter="data")
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_3\.bin.*3073-byte records.*not a positive multiple"):
        load_cifar10(data_dir=tmp_path)


def test_label_out_of_range_is_a_clear_error() -> None:
    record = bytes([12]) + bytes(3072)
    with pytest.raises(DataError, match="label 12.*only 10 classes"):
        decode_records(record, "bad.bin", num_classes=10)


def test_truncated_archive_on_disk_is_a_clear_error(official_archive: GeneratedCifar, tmp_path: Path) -> None:
    truncated = tmp_path / NAME
    data = official_archive.path.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=rf"{NAME}.*truncated or damaged.*Delete"):
        load_cifar10(data_dir=truncated)


def test_folder_without_cifar_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no CIFAR-10 data"):
        load_dataset("cifar10", data_dir=tmp_path)


# --- the download -------------------------------------------------------------------------------


def test_download_verifies_caches_and_never_asks_again(
    archive_server: ArchiveServer, official_archive: GeneratedCifar, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    before = len(archive_server.requests)
    raw = load_cifar10(cache_dir=cache, url=archive_server.url("ok", NAME), md5=official_archive.md5)
    assert_same_as_generated(raw, official_archive)
    assert len(archive_server.requests) == before + 1
    assert leftovers(cache) == {ARCHIVE_NAME}
    assert (cache / ARCHIVE_NAME).read_bytes() == official_archive.path.read_bytes()

    # Second load: served from the verified cache, even with a URL that would now fail.
    again = load_dataset(
        "cifar10",
        cache_dir=cache,
        download_url=archive_server.url("error", NAME),
        download_md5=official_archive.md5,
    )
    assert len(archive_server.requests) == before + 1
    np.testing.assert_array_equal(np.sort(again.y_test), np.sort(official_archive.y_test))


def test_wrong_md5_keeps_nothing(archive_server: ArchiveServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"has MD5 [0-9a-f]{32}, expected 0{32}.*re-run"):
        load_cifar10(cache_dir=cache, url=archive_server.url("ok", NAME), md5="0" * 32)
    assert leftovers(cache) == set()


def test_truncated_download_fails_clearly_then_resumes_with_range(
    archive_server: ArchiveServer, official_archive: GeneratedCifar, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    size = official_archive.path.stat().st_size
    with pytest.raises(DataError, match=rf"stopped after {size // 2} of {size} bytes.*re-run to resume"):
        load_cifar10(cache_dir=cache, url=archive_server.url("truncate", NAME), md5=official_archive.md5)
    # Only the .part is left, and it never counts as the archive.
    assert leftovers(cache) == {ARCHIVE_NAME + ".part"}

    raw = load_cifar10(cache_dir=cache, url=archive_server.url("ok", NAME), md5=official_archive.md5)
    assert_same_as_generated(raw, official_archive)
    assert archive_server.requests[-1] == (f"/ok/{NAME}", f"bytes={size // 2}-")
    assert leftovers(cache) == {ARCHIVE_NAME}


@pytest.mark.slow  # starts a second Python process and kills it
def test_killed_download_leaves_nothing_valid_and_is_resumed(
    archive_server: ArchiveServer, official_archive: GeneratedCifar, tmp_path: Path, project_root: Path
) -> None:
    cache = tmp_path / "cache"
    part = cache / (ARCHIVE_NAME + ".part")
    size = official_archive.path.stat().st_size
    code = (
        "import sys; from pathlib import Path; from trainer.data.cifar10 import load; "
        "load(cache_dir=Path(sys.argv[1]), url=sys.argv[2], md5=sys.argv[3])"
    )
    url = archive_server.url("stall", NAME)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(cache), url, official_archive.md5], cwd=project_root
    )
    try:
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size >= size // 2) and time.monotonic() < deadline:
            assert proc.poll() is None, "the download process ended before it could be killed"
            time.sleep(0.05)
        assert part.exists() and part.stat().st_size == size // 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    # Killed mid-transfer: no archive under its real name, so nothing half-written counts as valid.
    assert not (cache / ARCHIVE_NAME).exists()

    raw = load_cifar10(cache_dir=cache, url=archive_server.url("ok", NAME), md5=official_archive.md5)
    assert_same_as_generated(raw, official_archive)
    assert archive_server.requests[-1] == (f"/ok/{NAME}", f"bytes={size // 2}-")


def test_restart_from_scratch_when_server_ignores_range(
    archive_server: ArchiveServer, official_archive: GeneratedCifar, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / (ARCHIVE_NAME + ".part")).write_bytes(b"garbage from an older attempt")
    raw = load_cifar10(cache_dir=cache, url=archive_server.url("norange", NAME), md5=official_archive.md5)
    assert_same_as_generated(raw, official_archive)
    assert leftovers(cache) == {ARCHIVE_NAME}


def test_server_error_is_a_clear_error(archive_server: ArchiveServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"HTTP 500.*--data-dir"):
        load_cifar10(cache_dir=cache, url=archive_server.url("error", NAME), md5="0" * 32)
    assert leftovers(cache) == set()


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot reach http://127.0.0.1:9/"):
        load_cifar10(cache_dir=tmp_path, url=f"http://127.0.0.1:9/{NAME}", md5="0" * 32)


def test_damaged_cache_is_reported_not_used(official_archive: GeneratedCifar, tmp_path: Path) -> None:
    cached = tmp_path / ARCHIVE_NAME
    shutil.copy(official_archive.path, cached)
    with cached.open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(DataError, match=rf"cached file {cached} has MD5.*Delete {cached}"):
        load_cifar10(cache_dir=tmp_path, url="http://127.0.0.1:9/unused", md5=official_archive.md5)


# --- the python format --------------------------------------------------------------------------


def test_python_batches_load_bit_exactly(python_batches: GeneratedCifar) -> None:
    raw = load_cifar10(data_dir=python_batches.path)
    assert raw.notes == {"format": "python"}
    assert_same_as_generated(raw, python_batches)


def test_python_archive_loads_bit_exactly(python_batches: GeneratedCifar, tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(python_batches.path, arcname="cifar-10-batches-py")
    assert_same_as_generated(load_cifar10(data_dir=tmp_path), python_batches)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(python_batches: GeneratedCifar, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = python2_pickle({b"data": _RunsShell(marker), b"labels": []})
    with pytest.raises(DataError, match=r"refused to unpickle.*(posix|os)\.system is not allowed"):
        restricted_loads(evil, "evil")
    # Planted as a batch in an otherwise genuine folder, it stops the load and never runs.
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(python_batches.path, folder)
    (folder / "data_batch_2").write_bytes(evil)
    with pytest.raises(DataError, match=r"data_batch_2: refused to unpickle"):
        load_cifar10(data_dir=tmp_path)
    assert not marker.exists()
    # The payload is live: a plain unpickler would have run it.
    pickle.loads(evil)
    assert marker.exists()


def test_python_batch_with_wrong_shape_is_a_clear_error() -> None:
    bad = python2_pickle({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(DataError, match=r"x: b'data' rows must hold 3072 bytes, found shape \(3, 100\)"):
        decode_batch(bad, "x", num_classes=10)
    mismatch = python_batch_bytes(np.zeros((3, 32, 32, 3), np.uint8), [0, 1])
    with pytest.raises(DataError, match="3 images but 2 labels"):
        decode_batch(mismatch, "y", num_classes=10)
    with pytest.raises(DataError, match="truncated or damaged"):
        decode_batch(python_batch_bytes(np.zeros((3, 32, 32, 3), np.uint8), [0, 1, 2])[:-50], "z", 10)
