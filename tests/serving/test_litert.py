"""LiteRT runs the embedded model's predictions where a version converts and agrees with its SavedModel
(serving/backends/litert.py); every other version, and GATEWAY_RUNTIME=tensorflow, runs on TensorFlow."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from serving.backends import litert
from serving.backends.embedded import EmbeddedBackend, _call_signature, load_version
from serving.backends.litert_cache import ConversionCache
from tests.tfserving_double.tiny_model import CIFAR10_CLASSES, write_tiny_model

pytestmark = pytest.mark.slow  # saves, loads and converts SavedModels


def _signature_outputs(model, rows: np.ndarray) -> dict[str, np.ndarray]:
    outputs = model.signature(images=tf.constant(rows, tf.float32))
    return {key: outputs[key].numpy() for key in litert.PREDICTION_KEYS if key in outputs}


@pytest.fixture(scope="module")
def model(exported_model):
    """The trained exported version, loaded (and converted) once for this module's read-only tests."""
    return load_version(exported_model.base_path / exported_model.name, exported_model.version)


def test_the_trained_model_runs_on_litert_and_agrees_with_its_savedmodel(
    model, reference_pixels: np.ndarray
) -> None:
    assert model.runtime == "litert" and model.lite is not None
    assert set(model.lite.output_keys) == {"probabilities", "ood_score", "abstain"}
    # Sizes change between calls; both interpreters (all threads, and the one-thread one for busy times).
    cases = [(rows, parallel) for rows in (reference_pixels[:1], reference_pixels[:3], reference_pixels)
             for parallel in (True, False)]  # fmt: skip
    for rows, parallel in cases:
        want, got = _signature_outputs(model, rows), model.lite(rows, parallel)
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["ood_score"], want["ood_score"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got["abstain"], want["abstain"])
        np.testing.assert_array_equal(got["probabilities"].argmax(1), want["probabilities"].argmax(1))


def test_real_photos_get_the_same_answers_on_both_runtimes(model, cifar_sample) -> None:
    rows = np.stack(
        [
            np.asarray(Image.open(path).convert("RGB").resize((32, 32)), np.float32)
            for path, _ in cifar_sample[:32]
        ]
    )
    want, got = _signature_outputs(model, rows), model.lite(rows)
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got["abstain"], want["abstain"])


def test_concurrent_callers_each_get_their_own_rows(model, reference_pixels: np.ndarray) -> None:
    """Batch threads share one interpreter; it resizes per call, so unguarded calls would mix rows."""
    batches = [reference_pixels[: n + 1] for n in range(8)]
    expected = [model.lite(rows)["probabilities"] for rows in batches]
    wrong: list[int] = []

    def caller(offset: int) -> None:
        for i in range(40):
            n = (i + offset) % len(batches)
            if not np.array_equal(model.lite(batches[n])["probabilities"], expected[n]):
                wrong.append(n)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


class _NeedsTensorFlow(tf.Module):
    """The contract's serving_default, through an op LiteRT has no builtin for (Svd)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = tf.Variable(np.random.default_rng(0).normal(size=(3, 10)).astype("float32"))
        self.names = tf.constant(list(CIFAR10_CLASSES))

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="images")])
    def serving_default(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        corner = images[:, :3, :3, 0] / 255.0
        singular = tf.linalg.svd(corner, compute_uv=False)  # [N, 3]
        probabilities = tf.nn.softmax(singular @ self.weights)
        classes = tf.tile(self.names[tf.newaxis, :], [tf.shape(images)[0], 1])
        return {"probabilities": probabilities, "classes": classes}


def test_a_version_litert_cannot_convert_is_served_by_tensorflow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = _NeedsTensorFlow()
    staging = Path(tempfile.mkdtemp(dir=tmp_path))
    tf.saved_model.save(module, str(staging / "1"), signatures={"serving_default": module.serving_default})
    os.makedirs(tmp_path / "base")
    os.replace(staging, tmp_path / "base" / "cifar10")
    caplog.set_level(logging.WARNING, logger="serving.backends.embedded")
    backend = EmbeddedBackend(tmp_path / "base", "cifar10", poll_interval_s=60)
    try:
        assert backend.status().ready and backend._current.runtime == "tensorflow"
        assert backend.status().detail == "version 1 on TensorFlow"  # /readyz says which runtime answers
        rows = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
        prediction = backend.predict(rows)
        want = _signature_outputs(backend._current, rows)["probabilities"]
        np.testing.assert_array_equal(prediction.probabilities, want)
    finally:
        backend.close()
    assert "version 1 runs on TensorFlow, not LiteRT: LiteRT conversion failed" in caplog.text
    assert "Svd" in caplog.text


def test_runtime_tensorflow_keeps_every_prediction_on_the_savedmodel(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "cifar10", 1, ood=True)
    on_tf = EmbeddedBackend(tmp_path, "cifar10", poll_interval_s=60, runtime="tensorflow")
    on_lite = EmbeddedBackend(tmp_path, "cifar10", poll_interval_s=60, runtime="litert")
    try:
        assert on_tf._current.lite is None and on_tf._current.runtime == "tensorflow"
        assert on_lite._current.runtime == "litert"
        assert on_lite.status().detail == "version 1 on LiteRT"
        assert on_tf.status().detail == "version 1 on TensorFlow"
        rows = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3)).astype(np.float32)
        rows[0] = 0.0  # black: the tiny model abstains on it
        want = _signature_outputs(on_tf._current, rows)
        tf_answer, lite_answer = on_tf.predict(rows), on_lite.predict(rows)
        np.testing.assert_array_equal(tf_answer.probabilities, want["probabilities"])
        np.testing.assert_allclose(lite_answer.probabilities, want["probabilities"], rtol=0, atol=1e-5)
        assert lite_answer.abstain is not None and lite_answer.abstain[0]
        np.testing.assert_array_equal(lite_answer.abstain, tf_answer.abstain)
    finally:
        on_tf.close()
        on_lite.close()


def _burn(seconds: float) -> None:
    """Spend `seconds` of this process's CPU (the race times CPU, which sleeping does not use)."""
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


class _Counted:
    """A LiteSignature that counts its calls and can be made costlier."""

    def __init__(self, lite, cost_s: float = 0.0) -> None:
        self.lite, self.cost_s, self.calls = lite, cost_s, 0
        self.num_threads = lite.num_threads

    def __call__(self, rows: np.ndarray, parallel: bool = True) -> dict[str, np.ndarray]:
        self.calls += 1
        _burn(self.cost_s)
        return self.lite(rows, parallel)


def test_the_race_gives_large_batches_to_the_faster_runtime(model) -> None:
    """The same two runtimes, one made to cost 40 ms more CPU a call: the race names the other."""
    slow_lite = _Counted(model.lite, cost_s=0.04)
    timed = litert.race(slow_lite, model.signature, rows=4, rounds=2)
    assert slow_lite.calls == 3  # one untimed call, then one per round
    assert timed.litert_ms >= 40 and timed.tensorflow_wins
    tensorflow_calls: list[int] = []

    def slow_tensorflow(**inputs):
        tensorflow_calls.append(1)
        _burn(0.04)
        return model.signature(**inputs)

    timed = litert.race(model.lite, slow_tensorflow, rows=4, rounds=2)
    assert len(tensorflow_calls) == 3 and timed.tensorflow_ms >= 40 and not timed.tensorflow_wins
    # Within the margin LiteRT keeps them: a switch must pay for itself.
    assert not litert.Race(litert_ms=10.0, tensorflow_ms=9.6).tensorflow_wins
    assert litert.Race(litert_ms=10.0, tensorflow_ms=9.4).tensorflow_wins


def test_batches_from_the_threshold_run_on_tensorflow_and_agree(model, reference_pixels: np.ndarray) -> None:
    counted = _Counted(model.lite)
    routed = dataclasses.replace(model, lite=counted, tensorflow_from_rows=8)
    rows = np.concatenate([reference_pixels] * (12 // len(reference_pixels) + 1))[:12]
    for count, on_lite in ((1, 1), (7, 1), (8, 0), (12, 0)):
        before = counted.calls
        got = _call_signature(routed, rows[:count])
        assert counted.calls - before == on_lite, f"a batch of {count} ran on the wrong runtime"
        want = _signature_outputs(model, rows[:count])
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-5)
        assert set(got) == set(want)
    assert routed.runs_on(7) == "litert" and routed.runs_on(8) == "tensorflow"
    assert dataclasses.replace(model, tensorflow_from_rows=None).runs_on(10_000) == "litert"


def test_auto_routes_large_batches_by_the_race_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_tiny_model(tmp_path, "cifar10", 1, ood=True)
    caplog.set_level(logging.INFO, logger="serving.backends.embedded")
    for tensorflow_ms, detail in ((5.0, "version 1 on LiteRT (TensorFlow for batches of 16+ images)"),
                                  (50.0, "version 1 on LiteRT")):  # fmt: skip
        monkeypatch.setattr(litert, "race", lambda lite, signature, ms=tensorflow_ms: litert.Race(20.0, ms))
        backend = EmbeddedBackend(tmp_path, "cifar10", poll_interval_s=60, runtime="auto")
        try:
            assert backend.status().detail == detail
            rows = np.random.default_rng(3).integers(0, 256, (20, 32, 32, 3)).astype(np.float32)
            want = _signature_outputs(backend._current, rows)["probabilities"]
            np.testing.assert_allclose(backend.predict(rows).probabilities, want, rtol=0, atol=1e-5)
        finally:
            backend.close()
    chosen = "batches of 16+ images run on TensorFlow (a batch of 32: TensorFlow 5.0 ms of CPU, LiteRT 20.0"
    assert chosen in caplog.text
    assert "batches of 16+ images run on LiteRT (a batch of 32: TensorFlow 50.0 ms of CPU" in caplog.text


def test_the_race_is_run_once_per_machine_and_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept beside the cached conversion for the other workers and restarts; a note from another
    CPU, or one that does not parse, is raced again."""
    write_tiny_model(tmp_path, "cifar10", 1, ood=True)
    loaded = tf.saved_model.load(str(tmp_path / "cifar10" / "1"))
    signature = loaded.signatures["serving_default"]
    cache = ConversionCache(tmp_path / "cache")
    races: list[int] = []

    def counted_race(lite, signature):
        races.append(1)
        return litert.Race(20.0, 5.0)

    monkeypatch.setattr(litert, "race", counted_race)

    def load() -> litert.Race | None:
        return litert.load_lite(loaded, signature, 1, cache=cache, key="k" * 64, race_large_batches=True).race

    first, second = load(), load()
    assert len(races) == 1 and not first.cached and second.cached
    assert (second.litert_ms, second.tensorflow_ms) == (20.0, 5.0)
    note = tmp_path / "cache" / ("k" * 64 + ".race")
    note.write_text(note.read_text().replace(litert.cpu_fingerprint(1), "another-cpu"))
    assert not load().cached and len(races) == 2
    note.write_text("{not json")
    assert not load().cached and len(races) == 3
    assert litert.load_lite(loaded, signature, 1, cache=cache, key="k" * 64).race is None  # not asked


def test_cpu_fingerprint_tells_instruction_sets_and_threads_apart(tmp_path: Path) -> None:
    avx2 = tmp_path / "avx2"
    avx2.write_text("model name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n")
    avx512 = tmp_path / "avx512"
    avx512.write_text("model name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma avx512f avx512bw\n")
    assert litert.cpu_fingerprint(2, avx2) == litert.cpu_fingerprint(2, avx2)
    assert litert.cpu_fingerprint(2, avx2) != litert.cpu_fingerprint(2, avx512)
    assert litert.cpu_fingerprint(1, avx2) != litert.cpu_fingerprint(2, avx2)


def test_compare_names_what_disagrees(tmp_path: Path) -> None:
    write_tiny_model(tmp_path, "cifar10", 1, seed=0, ood=True)
    write_tiny_model(tmp_path, "cifar10", 2, seed=1, ood=True)
    one = load_version(tmp_path / "cifar10", 1, runtime="tensorflow")
    other = load_version(tmp_path / "cifar10", 2, runtime="tensorflow")
    rows = litert.probes()[1]
    reference = _signature_outputs(one, rows)
    assert litert.compare(reference, {k: v.copy() for k, v in reference.items()}) == (0.0, "")
    nudged = dict(reference, probabilities=reference["probabilities"] + 2e-6)
    assert litert.compare(reference, nudged)[1] == ""  # within the tolerance
    difference, problem = litert.compare(reference, _signature_outputs(other, rows))
    assert "output 'probabilities' differs by up to" in problem and difference > 1e-3
    flipped = dict(reference, abstain=~reference["abstain"])
    assert litert.compare(reference, flipped)[1] == "output 'abstain' differs"
    missing = {k: v for k, v in reference.items() if k != "ood_score"}
    assert litert.compare(reference, missing)[1] == "output 'ood_score' is missing"


def test_default_threads_follow_the_cpu_quota_and_affinity(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("100000 100000\n")  # a Kubernetes limit of 1 CPU
    assert litert.default_threads(cpu_max) == 1
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: 2 threads, if the affinity allows
    assert litert.default_threads(cpu_max) == min(2, affinity)
    cpu_max.write_text("max 100000\n")  # no limit: the affinity, at most 4
    assert litert.default_threads(cpu_max) == min(litert.MAX_DEFAULT_THREADS, affinity)
    assert litert.default_threads(tmp_path / "absent") == min(litert.MAX_DEFAULT_THREADS, affinity)
