"""The embedded backend: highest complete version, compiled signature, hot swap without failures."""

from __future__ import annotations

import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.app import create_app
from serving.backends.base import BackendTimeout, BackendUnavailable
from serving.backends.embedded import EmbeddedBackend
from serving.config import Settings
from tests.tfserving_double.tiny_model import write_tiny_model

pytestmark = pytest.mark.slow  # saves and loads SavedModels


def wait_for(condition, timeout_s: float = 30.0) -> None:  # condition: () -> bool
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_serves_the_highest_version(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "cifar10", 1, seed=0)
    write_tiny_model(tmp_path, "cifar10", 2, seed=1)
    backend = EmbeddedBackend(tmp_path, "cifar10", poll_interval_s=60)
    try:
        status = backend.status()
        assert status.ready and status.version == 2 and len(status.class_names) == 10
        prediction = backend.predict(np.zeros((3, 32, 32, 3), np.uint8))
        assert prediction.model_version == 2 and prediction.probabilities.shape == (3, 10)
    finally:
        backend.close()


def test_not_ready_until_a_version_is_published_and_broken_versions_are_skipped(tmp_path: Path) -> None:
    backend = EmbeddedBackend(tmp_path, "cifar10", poll_interval_s=0.1)
    try:
        assert not backend.status().ready
        with pytest.raises(BackendUnavailable, match="no published version"):
            backend.predict(np.zeros((1, 32, 32, 3), np.uint8))
        write_tiny_model(tmp_path, "cifar10", 1)
        wait_for(lambda: backend.status().ready)
        # A corrupt higher version must not take the served one down.
        broken = tmp_path / "cifar10" / "2"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"not a protobuf")
        assert backend.refresh() is False
        status = backend.status()
        assert status.ready and status.version == 1
        # Ready (version 1 answers), but operators see why version 2 is not live.
        assert list(status.failed_versions) == [2] and "failed to load" in status.detail
        assert backend.predict(np.zeros((1, 32, 32, 3), np.uint8)).model_version == 1
    finally:
        backend.close()


def test_deleting_the_served_version_rolls_back_to_the_newest_one_left(tmp_path: Path) -> None:
    import shutil

    write_tiny_model(tmp_path, "cifar10", 1, seed=0)
    write_tiny_model(tmp_path, "cifar10", 2, seed=1)
    backend = EmbeddedBackend(tmp_path, "cifar10", poll_interval_s=60)
    images = np.full((2, 32, 32, 3), 128, np.uint8)
    try:
        v2 = backend.predict(images)
        assert v2.model_version == 2
        shutil.rmtree(tmp_path / "cifar10" / "2")  # the documented quick rollback: remove the bad one
        assert backend.refresh() is True
        v1 = backend.predict(images)
        assert v1.model_version == 1 and backend.status().version == 1
        assert not np.allclose(v1.probabilities, v2.probabilities)  # really the other model
        shutil.rmtree(tmp_path / "cifar10" / "1")  # nothing left: not ready, no deleted model served
        assert backend.refresh() is True
        assert not backend.status().ready
        with pytest.raises(BackendUnavailable, match="no published version"):
            backend.predict(images)
    finally:
        backend.close()


def test_starts_on_the_newest_good_version_and_tries_a_broken_one_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import serving.backends.embedded as embedded

    write_tiny_model(tmp_path, "cifar10", 1)
    broken = tmp_path / "cifar10" / "2"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    attempts: list[int] = []
    real_load = embedded.load_version

    def counting_load(model_dir: Path, version: int, signature_name: str = "serving_default", **options):
        attempts.append(version)
        return real_load(model_dir, version, signature_name, **options)

    monkeypatch.setattr(embedded, "load_version", counting_load)
    backend = EmbeddedBackend(tmp_path, "cifar10", poll_interval_s=60)
    try:
        # A worker starting while a broken newest version sits on disk serves the good one below it.
        assert backend.status().version == 1
        assert attempts == [2, 1]
        for _ in range(3):  # later polls do not retry the unchanged broken version
            assert backend.refresh() is False
        assert attempts == [2, 1]
        # Publishing a fixed version under a new number is picked up as usual.
        write_tiny_model(tmp_path, "cifar10", 3)
        assert backend.refresh() is True and backend.status().version == 3
    finally:
        backend.close()


def test_new_version_is_swapped_in_while_requests_run(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "cifar10", 1, seed=0)
    app = create_app(Settings(model_base_path=tmp_path, model_name="cifar10", poll_interval_s=0.1))
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    data = buffer.getvalue()

    stop = threading.Event()
    failures: list[str] = []
    seen: list[list[tuple[int, tuple[float, ...]]]] = [[] for _ in range(4)]

    def client_loop(index: int) -> None:
        client = app.test_client()
        while not stop.is_set():
            response = client.post("/v1/predict", data=data, content_type="image/png")
            if response.status_code != 200:
                failures.append(response.get_data(as_text=True))
                continue
            body = response.get_json()
            # Rounded: the same image in batches of different sizes differs in the last bits.
            probabilities = body["predictions"][0]["probabilities"].values()
            seen[index].append((body["model"]["version"], tuple(round(p, 6) for p in probabilities)))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(len(s) >= 5 for s in seen))
        write_tiny_model(tmp_path, "cifar10", 2, seed=1)
        wait_for(lambda: all(s and s[-1][0] == 2 for s in seen))
        counts = [len(s) for s in seen]
        wait_for(lambda: all(len(s) >= c + 5 for s, c in zip(seen, counts, strict=True)))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        app.extensions["gateway.backend"].close()

    assert failures == []
    for answers in seen:
        versions = [v for v, _ in answers]
        assert versions == sorted(versions)  # switched once, never back
        assert versions[0] == 1 and versions[-1] == 2
        # Each version answers consistently, and the two models answer differently.
        by_version = {v: {p for w, p in answers if w == v} for v in (1, 2)}
        assert len(by_version[1]) == 1 and len(by_version[2]) == 1
        assert by_version[1] != by_version[2]


def test_a_model_call_past_the_deadline_is_a_timeout_not_a_hang(tmp_path: Path) -> None:
    import dataclasses

    write_tiny_model(tmp_path, "cifar10", 1)
    backend = EmbeddedBackend(tmp_path, "cifar10", poll_interval_s=60, deadline_s=0.3)
    try:
        fast = backend._current
        release = threading.Event()

        def stuck_signature(**inputs):  # stands in for an overloaded CPU
            release.wait(10)
            return fast.signature(**inputs)

        backend._current = dataclasses.replace(fast, signature=stuck_signature, lite=None)
        started = time.monotonic()
        with pytest.raises(BackendTimeout, match="did not answer within 0.3s"):
            backend.predict(np.zeros((1, 32, 32, 3), np.uint8))
        assert time.monotonic() - started < 2.0
        # A request queued behind the stuck call times out too, and is cancelled without running.
        with pytest.raises(BackendTimeout):
            backend.predict(np.zeros((1, 32, 32, 3), np.uint8))
        release.set()
        backend._current = fast
        wait_for(lambda: _answers(backend))
    finally:
        backend.close()


def _answers(backend: EmbeddedBackend) -> bool:
    try:
        return backend.predict(np.zeros((1, 32, 32, 3), np.uint8)).model_version == 1
    except BackendTimeout:
        return False
