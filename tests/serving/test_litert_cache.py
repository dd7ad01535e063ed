"""serving/backends/litert_cache.py: a version is converted once per machine; what is read back is
checked like a fresh conversion; the directory must be this user's alone."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from loadtest.gateway_process import running_gateway, wait_until
from serving.backends import litert
from serving.backends.embedded import load_version
from serving.backends.litert_cache import ConversionCache, cache_key
from tests.tfserving_double.tiny_model import write_tiny_model


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts litert.convert calls (a conversion, not a cache read)."""
    calls: list[int] = []
    convert = litert.convert

    def counted(saved_model, signature):  # noqa: ANN001, ANN202
        calls.append(1)
        return convert(saved_model, signature)

    monkeypatch.setattr(litert, "convert", counted)
    return calls


@pytest.fixture
def base(tmp_path: Path) -> Path:
    write_tiny_model(tmp_path / "base", "cifar10", 1, seed=0, ood=True)
    write_tiny_model(tmp_path / "base", "cifar10", 2, seed=1, ood=True)
    return tmp_path / "base"


def rows() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (6, 32, 32, 3)).astype(np.float32)


@pytest.mark.slow
def test_a_second_load_reads_the_conversion_and_answers_the_same(
    base: Path, tmp_path: Path, conversions: list[int]
) -> None:
    cache = ConversionCache(tmp_path / "cache")
    first = load_version(base / "cifar10", 1, litert_cache=cache)
    second = load_version(base / "cifar10", 1, litert_cache=cache)  # another worker, or a restart
    assert len(conversions) == 1
    assert first.lite is not None and second.lite is not None
    np.testing.assert_array_equal(second.lite(rows())["probabilities"], first.lite(rows())["probabilities"])
    assert [p.suffix for p in (tmp_path / "cache").glob("*.tflite")] == [".tflite"]
    load_version(base / "cifar10", 2, litert_cache=cache)  # another version: its own entry
    assert len(conversions) == 2 and len(list((tmp_path / "cache").glob("*.tflite"))) == 2


@pytest.mark.slow
def test_workers_loading_at_once_convert_once(base: Path, tmp_path: Path, conversions: list[int]) -> None:
    loaded: list[object] = []

    def worker() -> None:
        loaded.append(load_version(base / "cifar10", 1, litert_cache=ConversionCache(tmp_path / "cache")))

    workers = [threading.Thread(target=worker) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert len(loaded) == 3 and all(model.lite is not None for model in loaded)
    assert len(conversions) == 1  # the others waited on the entry's lock and read it


def test_the_time_waiting_for_another_workers_conversion_is_told_apart(base: Path, tmp_path: Path) -> None:
    """A worker waiting on the entry's lock logs the wait apart from its own read and check (a cold
    start's log said "read and checked in 3.1 s" for a read of milliseconds)."""
    import tensorflow as tf

    saved_model = tf.saved_model.load(str(base / "cifar10" / "1"))
    signature = saved_model.signatures["serving_default"]
    cache = ConversionCache(tmp_path / "cache")
    first = litert.load_lite(saved_model, signature, cache=cache, key="k")
    assert first.lite is not None and not first.cached and first.waited < 0.5
    results: list[tuple[litert.Conversion, float]] = []

    def load() -> None:
        started = time.monotonic()
        other_worker = ConversionCache(tmp_path / "cache")
        conversion = litert.load_lite(saved_model, signature, cache=other_worker, key="k")
        results.append((conversion, time.monotonic() - started))

    with cache.locked("k"):  # another worker converting the same version
        waiter = threading.Thread(target=load)
        waiter.start()
        time.sleep(2.0)
    waiter.join(60)
    ((second, total),) = results
    assert second.cached and second.lite is not None
    assert second.waited >= 1.9
    # The wait and the read-and-check add up to the call: `seconds` no longer includes the wait.
    assert abs(second.seconds + second.waited - total) < 0.1


@pytest.mark.slow
def test_a_damaged_or_wrong_entry_is_converted_again(
    base: Path, tmp_path: Path, conversions: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    cache = ConversionCache(tmp_path / "cache")

    def entry_of(version: int) -> Path:
        return tmp_path / "cache" / f"{cache_key(base / 'cifar10' / str(version), 'serving_default')}.tflite"

    entry = entry_of(1)
    good = load_version(base / "cifar10", 1, litert_cache=cache)
    valid = entry.read_bytes()
    entry.write_bytes(valid[: len(valid) // 2])  # a truncated file
    assert load_version(base / "cifar10", 1, litert_cache=cache).lite is not None
    assert len(conversions) == 2 and entry.read_bytes() == valid
    assert "the cached LiteRT conversion" in caplog.text and "LiteRT could not load" in caplog.text
    # A readable flatbuffer that is not this version's (version 2's weights): the probes catch it.
    other = load_version(base / "cifar10", 2, litert_cache=cache)
    entry.write_bytes(entry_of(2).read_bytes())
    again = load_version(base / "cifar10", 1, litert_cache=cache)
    assert len(conversions) == 4 and entry.read_bytes() == valid
    assert "LiteRT disagrees with the SavedModel" in caplog.text  # why the wrong entry was dropped
    want = good.lite(rows())["probabilities"]
    np.testing.assert_array_equal(again.lite(rows())["probabilities"], want)
    assert not np.allclose(other.lite(rows())["probabilities"], want)  # the wrong entry was wrong


@pytest.mark.slow
def test_the_key_follows_every_file_of_the_version(base: Path) -> None:
    version = base / "cifar10" / "1"
    key = cache_key(version, "serving_default")
    assert cache_key(version, "serving_default") == key
    assert cache_key(version, "explain") != key
    (data,) = (version / "variables").glob("variables.data-*")
    content = bytearray(data.read_bytes())
    content[-1] ^= 1  # one bit of one weight: republished with other weights
    data.write_bytes(bytes(content))
    assert cache_key(version, "serving_default") != key


def test_a_directory_others_can_write_is_not_used(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # mkdir's mode is masked by the umask
    cache = ConversionCache(shared)
    assert not cache.usable and "writable by other users" in cache.problem
    cache.write("k", b"planted")
    assert cache.read("k") is None and not list(shared.iterdir())
    (tmp_path / "file").write_text("")
    assert "is not a directory" in ConversionCache(tmp_path / "file").problem
    made = ConversionCache(tmp_path / "new" / "cache")  # made here, for this user only
    assert made.usable and (os.stat(tmp_path / "new" / "cache").st_mode & 0o777) == 0o700
    if os.getuid() == 0:  # root can hand a directory to someone else
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 12345, 12345)
        assert "belongs to another user" in ConversionCache(theirs).problem


@pytest.mark.slow
def test_a_directory_removed_or_replaced_after_start_never_fails_a_load(
    base: Path, tmp_path: Path, conversions: list[int]
) -> None:
    """A temporary-file cleaner may delete the directory under a running gateway: it is made again.
    One swapped for a directory others may write is not used from then on. Neither fails a load."""
    directory = tmp_path / "cache"
    cache = ConversionCache(directory)
    shutil.rmtree(directory)
    assert load_version(base / "cifar10", 1, litert_cache=cache).lite is not None
    assert len(list(directory.glob("*.tflite"))) == 1 and (directory.stat().st_mode & 0o777) == 0o700
    shutil.rmtree(directory)
    directory.mkdir()
    os.chmod(directory, 0o777)
    assert load_version(base / "cifar10", 1, litert_cache=cache).lite is not None
    assert not cache.usable and "writable by other users" in cache.problem
    assert not list(directory.iterdir()) and len(conversions) == 2


def test_the_least_recently_used_entries_go_beyond_keep(tmp_path: Path) -> None:
    cache = ConversionCache(tmp_path, keep=2)
    for age, key in ((30, "a"), (20, "b")):
        cache.write(key, key.encode())
        cache.write_note(key, f"race of {key}")
        os.utime(tmp_path / f"{key}.tflite", (time.time() - age, time.time() - age))
    assert cache.read("a") == b"a"  # used now: newer than b
    cache.write("c", b"c")
    assert sorted(p.stem for p in tmp_path.glob("*.tflite")) == ["a", "c"]
    assert cache.read_note("a") == "race of a" and cache.read_note("b") is None  # gone with its entry
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_gunicorn_workers_share_one_conversion(base: Path, tmp_path: Path) -> None:
    env = {
        "GATEWAY_MODEL_BASE_PATH": str(base),
        "GATEWAY_MODEL_NAME": "cifar10",
        "GATEWAY_TFSERVING_ADDRESS": "",
        "GATEWAY_LITERT_CACHE_DIR": str(tmp_path / "cache"),
    }
    with running_gateway(env, workers=2, log_dir=tmp_path / "log") as gateway:
        # Ready means one worker answered; the other may still be loading.
        wait_until(lambda: gateway.log().count("version 2 runs on LiteRT") == 2, 120, "both on LiteRT")
        log = gateway.log()
    assert log.count("converted and checked") == 1, log[-3000:]
    assert log.count("read from the conversion cache and checked") == 1, log[-3000:]
