"""Temperature scaling at export (trainer/export/calibration.py, trust.py): the fit lowers expected
calibration error on held-out data, and every signature serves softmax(logits / T)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax

from trainer.export.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability,
)


def _overconfident(n: int, seed: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (so z is calibrated), returned with logits `scale` x z: a model
    `scale` times too sure of itself."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, 10))
    labels = np.array([rng.choice(10, p=p) for p in softmax(z, axis=1)])
    return z * scale, labels


def test_fitted_temperature_undoes_overconfidence_on_held_out_data():
    fit_logits, fit_labels = _overconfident(3000, seed=0, scale=3.0)
    held_logits, held_labels = _overconfident(3000, seed=1, scale=3.0)
    temperature = fit_temperature(fit_logits, fit_labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(apply_temperature(held_logits, 1.0), held_labels)
    after = expected_calibration_error(apply_temperature(held_logits, temperature), held_labels)
    assert before > 0.1 and after < before / 3, (before, after)


def test_ece_is_the_count_weighted_gap_between_accuracy_and_confidence():
    # Four images, confidence 0.9 (two right, two wrong) -> one bin, |0.5 - 0.9| = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    labels = np.array([0, 1, 1, 0])
    rel = reliability(probs, labels)
    assert rel.counts.sum() == 4 and np.count_nonzero(rel.counts) == 1
    assert rel.ece == pytest.approx(0.4)


def test_fit_is_fast_on_a_cifar_sized_split():
    import time

    logits, labels = _overconfident(10_000, seed=2, scale=2.0)
    start = time.perf_counter()
    fit_temperature(logits, labels)
    assert time.perf_counter() - start < 2.0


@pytest.mark.slow
def test_export_lowers_ece_and_the_graph_applies_the_temperature(exported_model, exported_session):
    """The card's ECE is measured on the test split, the temperature fitted on the validation split;
    serving_default, serving_bytes' pixels path and explain all return softmax(logits / T)."""
    import keras

    import trainer.models  # noqa: F401 - custom layers
    from trainer.export.trust import Reader

    card = json.loads((exported_model.path / "assets.extra" / "model_card.json").read_text())
    calibration = card["calibration"]
    assert calibration["fitted"] is True
    assert "validation split" in calibration["held_out"]
    assert calibration["ece_after"] < calibration["ece_before"], calibration
    temperature = calibration["temperature"]
    assert abs(temperature - 1.0) > 0.05  # the tiny run is miscalibrated enough for the test to mean it

    model = keras.saving.load_model(exported_model.run_dir / "model.keras", compile=False)
    pixels = np.random.default_rng(5).integers(0, 256, size=(6, 32, 32, 3)).astype(np.float32)
    logits, _ = Reader(model)(pixels)
    expected = apply_temperature(logits, temperature)
    served = exported_session.run("serving_default", {"images": pixels})
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5, rtol=0)
    uncalibrated = np.asarray(model.predict(pixels, verbose=0))
    assert np.abs(served["probabilities"] - uncalibrated).max() > 1e-3  # the temperature is really in
    np.testing.assert_array_equal(served["probabilities"].argmax(1), uncalibrated.argmax(1))
    explained = exported_session.run("explain", {"images": pixels, "class_index": np.full(6, -1, np.int32)})
    np.testing.assert_allclose(explained["probabilities"], served["probabilities"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_reliability_diagram_and_report_are_written(exported_model):
    trust_dir = exported_model.path / "assets.extra" / "trust"
    assert (trust_dir / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((trust_dir / "ood_report.json").read_text())
    assert report["calibration"]["temperature"] > 0
    # The run's reports/ gets the same files (the latest export's).
    assert (exported_model.run_dir / "reports" / "trust" / "reliability.png").is_file()
