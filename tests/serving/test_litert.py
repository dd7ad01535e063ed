"""LiteRT runs the embedded model's predictions where a version converts and agrees with its SavedModel
(serving/backends/litert.py); every other version, and GATEWAY_RUNTIME=tensorflow, runs on TensorFlow."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from serving.backends import litert
from serving.backends.embedded import EmbeddedBackend, load_version
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
    on_lite = EmbeddedBackend(tmp_path, "cifar10", poll_interval_s=60)
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
