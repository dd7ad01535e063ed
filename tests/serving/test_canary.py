"""Stable and canary versions in the embedded backend (serving/canary.py, labels.json).

Labels are written here the way `python -m trainer.export promote|rollback|canary` writes them
(MODEL_BASE/<name>/labels.json, atomically); the models are tiny real SavedModels that answer
differently per seed, so which version answered is visible in the probabilities.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from serving import canary
from serving.backends.embedded import EmbeddedBackend, load_version
from serving.canary import CANARY, STABLE, Comparisons, LabelsError, active_canary, parse_labels
from tests.tfserving_double.tiny_model import write_tiny_model

NAME = "cifar10"


def write_labels(model_base: Path, **labels: object) -> None:
    """labels.json as trainer.export writes it: a temporary file renamed over the old one."""
    model_dir = model_base / NAME
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".labels-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"canary": None, "canary_percent": 0.0, "mode": "split", **labels}, f)
    os.replace(tmp, model_dir / "labels.json")


def sample(name: str, version: int, role: str) -> float:
    return REGISTRY.get_sample_value(name, {"version": str(version), "role": role}) or 0.0


def images(n: int, seed: int = 0) -> np.ndarray:
    """Flat colours spread over the colour cube: the tiny models (a map of the mean colour) answer
    with different top classes across them, and two seeds disagree on some."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(n, 1, 1, 3), dtype=np.uint8)
    return np.broadcast_to(colours, (n, 32, 32, 3)).copy()


@pytest.fixture(scope="module")
def model_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Versions 1, 2 and 3 of the tiny model, each with other weights. Tests copy it to write labels."""
    base = tmp_path_factory.mktemp("canary-base")
    for version in (1, 2, 3):
        write_tiny_model(base, NAME, version, seed=version)
    return base


@pytest.fixture
def base(model_base: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(model_base, tmp_path / "base")
    return tmp_path / "base"


# ---- labels.json ------------------------------------------------------------------------------


def test_labels_in_force_and_the_active_canary() -> None:
    """The file format is contract/labels.py's (shared with trainer/export/labels.py); what the
    gateway makes of it: a canary with no share, or equal to stable, is no canary."""
    labels = parse_labels('{"stable": 3, "canary": 4, "canary_percent": 10, "mode": "shadow"}')
    assert (labels.stable, labels.canary, labels.canary_percent, labels.mode) == (3, 4, 10.0, "shadow")
    assert active_canary(labels) == 4
    assert active_canary(parse_labels('{"stable": 3, "canary": null}')) is None
    assert active_canary(parse_labels('{"stable": 3, "canary": 4, "canary_percent": 0}')) is None
    assert active_canary(parse_labels('{"stable": 3, "canary": 3, "canary_percent": 50}')) is None
    for text, problem in [
        ("{", "is not JSON"),
        ('{"canary": 2}', "'stable' must be a version number"),
        ('{"stable": 1, "canary_percent": 150}', "from 0 to 100"),
        ('{"stable": 1, "mode": "mirror"}', "'mode' must be one of"),
    ]:
        with pytest.raises(LabelsError, match=problem):
            parse_labels(text)


def test_comparisons_are_dropped_when_the_pool_is_busy() -> None:
    """Shadow work never queues behind itself: past the bound it is dropped and counted."""
    comparisons = Comparisons(max_pending=2)
    release = threading.Event()
    before = REGISTRY.get_sample_value("gateway_shadow_dropped_total") or 0.0
    try:
        assert comparisons.submit(release.wait) and comparisons.submit(release.wait)
        assert comparisons.submit(release.wait) is False
        assert (REGISTRY.get_sample_value("gateway_shadow_dropped_total") or 0.0) - before == 1
        release.set()
        assert comparisons.drain(10)
        assert comparisons.submit(lambda: None)  # room again once the work is done
        assert comparisons.drain(10)
    finally:
        release.set()
        comparisons.close()


# ---- the embedded backend ------------------------------------------------------------------------

@pytest.mark.slow
def test_stable_label_takes_all_traffic_and_survives_a_restart(base: Path) -> None:
    write_labels(base, stable=2)
    backend = EmbeddedBackend(base, NAME, poll_interval_s=60)
    try:
        # Version 3 is published but not labelled: it waits; stable (2) answers everything.
        assert backend.status().version == 2 and "(stable)" in backend.status().detail
        assert backend.status().rollout == {"stable": 2, "canary": None, "canary_percent": 0.0, "mode": "split"}  # noqa: E501
        assert {backend.predict(images(2)).model_version for _ in range(20)} == {2}
    finally:
        backend.close()
    restarted = EmbeddedBackend(base, NAME, poll_interval_s=60)  # a new worker, or the whole gateway
    try:
        assert restarted.status().version == 2
        assert restarted.predict(images(1)).model_version == 2
        # Without labels.json the newest version takes all traffic again (today's behaviour).
        (base / NAME / "labels.json").unlink()
        assert restarted.refresh() is True
        assert restarted.predict(images(1)).model_version == 3
        assert restarted.status().rollout is None
    finally:
        restarted.close()


@pytest.mark.slow
def test_canary_at_ten_percent_gets_about_ten_percent(base: Path) -> None:
    write_labels(base, stable=1, canary=2, canary_percent=10.0, mode="split")
    backend = EmbeddedBackend(base, NAME, poll_interval_s=60, rng=random.Random(20261206))
    n = 2000
    requests = "gateway_version_requests_total"
    before = {role: sample(requests, v, role) for v, role in [(1, STABLE), (2, CANARY)]}
    try:
        versions = [backend.predict(images(1, seed=i % 7)).model_version for i in range(n)]
        assert backend._comparisons.drain(30)
        rollout = backend.status().rollout
    finally:
        backend.close()
    assert rollout == {"stable": 1, "canary": 2, "canary_percent": 10.0, "mode": "split"}
    canary_count = versions.count(2)
    assert set(versions) == {1, 2}
    # Binomial(2000, 0.1): mean 200, sd 13.4; 99.9% two-sided interval is mean +- 3.29 sd.
    sd = (n * 0.1 * 0.9) ** 0.5
    assert abs(canary_count - n * 0.1) <= 3.29 * sd, f"canary answered {canary_count} of {n}"
    # The per-version metrics count the same split.
    assert sample("gateway_version_requests_total", 2, "canary") - before["canary"] == canary_count
    assert sample("gateway_version_requests_total", 1, "stable") - before["stable"] == n - canary_count


@pytest.mark.slow
def test_shadow_mode_never_changes_the_answer_and_records_agreement(base: Path) -> None:
    batch = images(64, seed=3)
    write_labels(base, stable=1)
    backend = EmbeddedBackend(base, NAME, poll_interval_s=60, rng=random.Random(1))
    try:
        alone = [backend.predict(batch[i : i + 1]).probabilities for i in range(len(batch))]
        write_labels(base, stable=1, canary=2, canary_percent=100.0, mode="shadow")
        backend.refresh()
        compared = sample("gateway_version_compared_total", 2, "shadow")
        agreed = sample("gateway_version_agreed_total", 2, "shadow")
        shadowed = []
        for i in range(len(batch)):
            prediction = backend.predict(batch[i : i + 1])
            assert prediction.model_version == 1  # the user always gets stable's answer
            shadowed.append(prediction.probabilities)
            assert backend._comparisons.drain(30)  # one at a time: none is dropped for being busy
    finally:
        backend.close()
    for mine, reference in zip(shadowed, alone, strict=True):
        np.testing.assert_array_equal(mine, reference)  # bit for bit stable's own answer
    # The agreement recorded is the models' real top-1 agreement on these images.
    v1 = load_version(base / NAME, 1).signature(images=batch.astype(np.float32))["probabilities"].numpy()
    v2 = load_version(base / NAME, 2).signature(images=batch.astype(np.float32))["probabilities"].numpy()
    truth = int(np.sum(v1.argmax(1) == v2.argmax(1)))
    assert 0 < truth < len(batch), "the two versions should agree on some images and not on others"
    assert sample("gateway_version_compared_total", 2, "shadow") - compared == len(batch)
    assert sample("gateway_version_agreed_total", 2, "shadow") - agreed == truth
    assert sample("gateway_version_requests_total", 2, "shadow") >= len(batch)


@pytest.mark.slow
def test_canary_answers_are_compared_with_stable(base: Path) -> None:
    batch = images(16, seed=5)
    write_labels(base, stable=1, canary=3, canary_percent=100.0, mode="split")
    backend = EmbeddedBackend(base, NAME, poll_interval_s=60)
    compared = sample("gateway_version_compared_total", 3, "canary")
    try:
        prediction = backend.predict(batch)
        assert prediction.model_version == 3
        assert backend._comparisons.drain(30)
    finally:
        backend.close()
    assert sample("gateway_version_compared_total", 3, "canary") - compared == len(batch)


@pytest.mark.slow
def test_promote_and_rollback_by_relabelling_lose_no_request(base: Path) -> None:
    write_labels(base, stable=1)
    backend = EmbeddedBackend(base, NAME, poll_interval_s=0.05, deadline_s=5.0)
    stop = threading.Event()
    answers: list[int] = []
    failures: list[str] = []

    def client() -> None:
        while not stop.is_set():
            try:
                answers.append(backend.predict(images(1)).model_version)
            except Exception as error:  # every failure is a lost request
                failures.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for labels, expected in [
            ({"stable": 1, "canary": 2, "canary_percent": 50.0}, {1, 2}),
            ({"stable": 2}, {2}),  # promote
            ({"stable": 1}, {1}),  # rollback
            ({"stable": 3, "canary": 1, "canary_percent": 30.0, "mode": "shadow"}, {3}),
        ]:
            write_labels(base, **labels)
            deadline = time.monotonic() + 30
            while True:
                mark = len(answers)
                time.sleep(0.3)
                if set(answers[mark:]) == expected:
                    break
                assert time.monotonic() < deadline, f"answers never became {expected} for {labels}"
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        backend.close()
    assert failures == []
    assert len(answers) > 50


@pytest.mark.slow
def test_rollback_to_the_previous_stable_needs_no_load(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stable version before a promote stays loaded: rolling back swaps at once, with no load
    from disk competing with requests for the CPU."""
    import serving.backends.embedded as embedded

    loads: list[int] = []
    real_load = embedded.load_version

    def counting_load(model_dir: Path, version: int, signature_name: str = "serving_default", **options):
        loads.append(version)
        return real_load(model_dir, version, signature_name, **options)

    monkeypatch.setattr(embedded, "load_version", counting_load)
    write_labels(base, stable=1)
    backend = EmbeddedBackend(base, NAME, poll_interval_s=60)
    try:
        for stable in (2, 1, 2, 1):  # promote, rollback, promote, rollback
            write_labels(base, stable=stable)
            assert backend.refresh() is True
            assert backend.predict(images(1)).model_version == stable
        assert loads == [1, 2]
    finally:
        backend.close()


@pytest.mark.slow
def test_bad_labels_keep_the_labels_in_force_and_say_why(base: Path) -> None:
    write_labels(base, stable=2)
    backend = EmbeddedBackend(base, NAME, poll_interval_s=60)
    try:
        (base / NAME / "labels.json").write_text("{not json")
        backend.refresh()
        status = backend.status()
        assert status.ready and status.version == 2 and "is not JSON" in status.detail
        assert str(base) not in status.detail  # /readyz shows no server paths
        write_labels(base, stable=9)  # a version that was never published
        backend.refresh()
        status = backend.status()
        assert status.version == 2 and "stable version 9, which is not published" in status.detail
        assert str(base) not in status.detail  # /readyz shows no server paths
        assert backend.predict(images(1)).model_version == 2
    finally:
        backend.close()
    started_on_missing = EmbeddedBackend(base, NAME, poll_interval_s=60)
    try:  # nothing is served rather than an unvetted version
        assert not started_on_missing.status().ready
        assert "stable version 9" in started_on_missing.status().detail
    finally:
        started_on_missing.close()


@pytest.mark.slow
def test_metrics_page_shows_versions_and_roles(base: Path) -> None:
    from tests.fixtures.gateway import embedded_gateway

    write_labels(base, stable=1, canary=2, canary_percent=100.0, mode="shadow")
    with embedded_gateway(base, NAME) as app:
        client = app.test_client()
        from tests.drills.traffic import small_png

        response = client.post("/v1/predict", data=small_png(), content_type="image/png")
        assert response.status_code == 200 and response.get_json()["model"]["version"] == 1
        app.extensions["gateway.backend"]._comparisons.drain(30)
        text = client.get("/metrics").get_data(as_text=True)
    for line in (
        'gateway_version_requests_total{role="stable",version="1"}',
        'gateway_version_requests_total{role="shadow",version="2"}',
        'gateway_version_compared_total{role="shadow",version="2"}',
        'gateway_version_seconds_bucket{le="0.001",role="stable",version="1"}',
    ):
        assert line in text, f"{line} missing from /metrics"
    assert canary.LABELS_FILE == "labels.json"


# ---- the TF Serving backend ----------------------------------------------------------------------


@pytest.fixture
def labelled_double(base: Path, tmp_path: Path):
    """The TF Serving double serving versions 1 and 2 with version_labels stable=1, canary=2 (the
    models.config trainer.export writes with --serving-config)."""
    from tests.tfserving_double import TFServingDouble
    from tests.tfserving_double.test_version_labels import models_config

    config = tmp_path / "models.config"
    config.write_text(models_config(base, [1, 2], {"stable": 1, "canary": 2}))
    with TFServingDouble(base, model_config=config, poll_interval_s=60) as double:
        yield double


def tfserving_backend(base: Path, address: str, seed: int = 0):
    from serving.backends.tfserving import TFServingBackend

    return TFServingBackend(
        address, NAME, labels_dir=base / NAME, poll_interval_s=0.0, rng=random.Random(seed)
    )


def test_tfserving_requests_arriving_during_the_first_read_get_its_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gthread workers call labels() from several threads: one arriving while another reads
    labels.json (the first time: nothing read yet) must wait for that read, not go out without a
    label and be answered by TF Serving's latest version (seen in the TF Serving drill)."""
    (tmp_path / NAME).mkdir()
    write_labels(tmp_path, stable=1)
    reading = threading.Event()
    slow_read = canary.LabelsFile.read

    def read(self: canary.LabelsFile) -> canary.Labels | None:
        reading.set()
        time.sleep(0.3)  # a slow disk: the second request arrives meanwhile
        return slow_read(self)

    monkeypatch.setattr(canary.LabelsFile, "read", read)
    backend = tfserving_backend(tmp_path, "127.0.0.1:1")  # labels() makes no call
    backend.poll_interval_s = 60.0
    try:
        first: list[canary.Labels | None] = []
        reader = threading.Thread(target=lambda: first.append(backend.labels()))
        reader.start()
        assert reading.wait(10)
        during = backend.labels()
        reader.join(10)
    finally:
        backend.close()
    assert first[0] is not None and first[0].stable == 1
    assert during == first[0]


@pytest.mark.slow
def test_tfserving_requests_carry_the_version_label_by_the_split(base: Path, labelled_double) -> None:
    backend = tfserving_backend(base, labelled_double.address)
    try:
        # No labels.json: no label sent, TF Serving's latest (2) answers, as today.
        assert backend.predict(images(1)).model_version == 2
        write_labels(base, stable=1, canary=2, canary_percent=30.0, mode="split")
        n = 600
        versions = [backend.predict(images(1, seed=i % 5)).model_version for i in range(n)]
        assert backend.status().version == 1  # with labels the stable version is the one reported
        assert backend.status().rollout == {"stable": 1, "canary": 2, "canary_percent": 30.0, "mode": "split"}
        backend._comparisons.drain(30)
    finally:
        backend.close()
    sd = (n * 0.3 * 0.7) ** 0.5
    assert set(versions) == {1, 2}
    assert abs(versions.count(2) - n * 0.3) <= 3.29 * sd, f"canary answered {versions.count(2)} of {n}"
    # Without a label the double answers with its latest (2): version 1 answers prove "stable" was sent.


@pytest.mark.slow
def test_tfserving_shadow_answers_with_stable_and_compares_the_canary(base: Path, labelled_double) -> None:
    batch = images(32, seed=3)
    backend = tfserving_backend(base, labelled_double.address)
    try:
        write_labels(base, stable=1)
        alone = backend.predict(batch).probabilities
        write_labels(base, stable=1, canary=2, canary_percent=100.0, mode="shadow")
        compared = sample("gateway_version_compared_total", 2, "shadow")
        prediction = backend.predict(batch)
        assert backend._comparisons.drain(30)
    finally:
        backend.close()
    assert prediction.model_version == 1
    np.testing.assert_array_equal(prediction.probabilities, alone)
    assert sample("gateway_version_compared_total", 2, "shadow") - compared == len(batch)


@pytest.mark.slow
def test_tfserving_without_the_labels_yet_answers_instead_of_failing(base: Path, tmp_path: Path) -> None:
    """TF Serving re-reads its models.config only every poll (60 s in compose): until it knows the
    labels, a canary request is answered by stable and a stable one by its latest version, counted."""
    from tests.tfserving_double import TFServingDouble
    from tests.tfserving_double.test_version_labels import models_config

    config = tmp_path / "models.config"
    config.write_text(models_config(base, [1, 2], {"stable": 1}))  # no canary label yet
    write_labels(base, stable=1, canary=2, canary_percent=100.0)
    unknown = REGISTRY.get_sample_value("gateway_version_label_unknown_total", {"label": "canary"}) or 0.0
    with TFServingDouble(base, model_config=config, poll_interval_s=60) as double:
        backend = tfserving_backend(base, double.address)
        try:
            assert backend.predict(images(1)).model_version == 1  # the canary's share went to stable
            # /v1/models does not call version 2 the canary while TF Serving refuses its label.
            assert backend.status().rollout == {"stable": 1, "canary": None, "canary_percent": 0.0, "mode": "split"}  # noqa: E501
        finally:
            backend.close()
    write_labels(base, stable=1, canary=2, canary_percent=100.0, mode="shadow")
    with TFServingDouble(base, model_config=config, poll_interval_s=60) as double:
        backend = tfserving_backend(base, double.address)
        try:  # the same in shadow mode, where only the background copy asks for the canary label
            assert backend.predict(images(1)).model_version == 1
            assert backend._comparisons.drain(30)
            assert backend.status().rollout == {"stable": 1, "canary": None, "canary_percent": 0.0, "mode": "shadow"}  # noqa: E501
        finally:
            backend.close()
    with TFServingDouble(base, poll_interval_s=60) as double:  # no models.config: no labels at all
        backend = tfserving_backend(base, double.address)
        try:
            write_labels(base, stable=1)
            assert backend.predict(images(1)).model_version == 3  # TF Serving's latest, not an error
        finally:
            backend.close()
    after = REGISTRY.get_sample_value("gateway_version_label_unknown_total", {"label": "canary"}) or 0.0
    assert after - unknown == 1
    assert (REGISTRY.get_sample_value("gateway_version_label_unknown_total", {"label": "stable"}) or 0) >= 1
