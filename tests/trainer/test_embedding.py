"""Feature-space report: PCA is right, the features are the ones the head classifies, the trained
features separate the classes, and evaluation writes reports/embedding.png."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.embedding import feature_model, pca_2d, penultimate_features, write_embedding_report


def test_pca_matches_the_covariance_eigenvectors_and_variance_ratios():
    rng = np.random.default_rng(0)
    # Anisotropic cloud in 6-D with known spread per axis, rotated randomly.
    scales = np.array([10.0, 4.0, 1.0, 0.5, 0.2, 0.1])
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    data = (rng.normal(size=(500, 6)) * scales) @ rotation.T + 7.0
    points, ratio = pca_2d(data)
    # Independent reference: eigen-decomposition of the covariance matrix.
    eigvals, eigvecs = np.linalg.eigh(np.cov(data, rowvar=False))
    order = np.argsort(eigvals)[::-1]
    expected_ratio = eigvals[order][:2] / eigvals.sum()
    np.testing.assert_allclose(ratio, expected_ratio, rtol=1e-6)
    reference = (data - data.mean(axis=0)) @ eigvecs[:, order[:2]]
    for k in range(2):  # eigenvectors are defined up to sign
        assert np.allclose(points[:, k], reference[:, k], atol=1e-6) or np.allclose(
            points[:, k], -reference[:, k], atol=1e-6
        )
    np.testing.assert_allclose(points.mean(axis=0), 0.0, atol=1e-9)


def test_pca_refuses_a_matrix_it_cannot_project():
    with pytest.raises(ValueError, match=r"\[N>=2, D\]"):
        pca_2d(np.zeros((1, 5)))
    with pytest.raises(ValueError, match=r"\[N>=2, D\]"):
        pca_2d(np.zeros(5))


@pytest.fixture(scope="module")
def trained(trained_run_dir: Path):
    import keras

    import trainer.models  # noqa: F401  (custom layers)
    from trainer.data.synthetic import generate

    described = json.loads((trained_run_dir / "dataset.json").read_text())
    x, y = generate(described["num_test"], described["notes"]["test_seed"])
    model = keras.saving.load_model(trained_run_dir / "model.keras", compile=False)
    return model, x, y


@pytest.mark.slow
def test_features_are_what_the_softmax_head_classifies(trained):
    model, x, _ = trained
    features = penultimate_features(model, x[:32])
    head = model.get_layer("logits")
    assert features.shape == (32, head.kernel.shape[0])
    logits = features @ np.asarray(head.kernel) + np.asarray(head.bias)
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax, model.predict(x[:32].astype(np.float32), verbose=0), atol=1e-5)


@pytest.mark.slow
def test_trained_features_separate_the_classes_better_than_untrained_ones(trained):
    from trainer.models import build_model

    model, x, y = trained

    def separation(m) -> float:
        # Fisher-style ratio in the 2-D view: spread of class centroids over spread within classes.
        points, _ = pca_2d(penultimate_features(m, x))
        centroids = np.stack([points[y == c].mean(axis=0) for c in np.unique(y)])
        within = np.mean([points[y == c].var(axis=0).sum() for c in np.unique(y)])
        return float(centroids.var(axis=0).sum() / within)

    untrained = build_model("bn_cnn", num_classes=10, mean=[127.0] * 3, std=[64.0] * 3, width=16)
    trained_ratio, untrained_ratio = separation(model), separation(untrained)
    assert trained_ratio > 2 * untrained_ratio, (trained_ratio, untrained_ratio)


def test_feature_model_needs_a_dense_head():
    import keras

    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match="no Dense head layer"):
        feature_model(keras.Model(inputs, keras.layers.Softmax()(inputs)))


@pytest.mark.slow
def test_report_png_has_a_point_per_image_coloured_by_class(trained, tmp_path):
    model, x, y = trained
    path = write_embedding_report(
        model, x[:60], y[:60], [f"c{i}" for i in range(10)], tmp_path / "e.png", max_points=50
    )
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 300
    # tab10's first colours (blue, orange, green), drawn at alpha 0.7 on white: classes get distinct colours.
    for rgb in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        blended = 0.7 * np.array(rgb) + 0.3 * 255
        close = np.abs(image.astype(float) - blended).sum(axis=-1) < 30
        assert close.sum() > 10, f"no points in class colour {rgb}"
    with pytest.raises(ValueError, match="60 images but 59 labels"):
        write_embedding_report(model, x[:60], y[:59], ["a"] * 10, tmp_path / "bad.png")


@pytest.mark.slow
def test_evaluating_a_run_writes_the_embedding_report(trained_run_dir, tmp_path):
    from trainer.evaluate import evaluate_run

    run_dir = Path(shutil.copytree(trained_run_dir, tmp_path / "run"))
    (run_dir / "reports" / "embedding.png").unlink(missing_ok=True)
    evaluate_run(run_dir, log=lambda _msg: None)
    written = run_dir / "reports" / "embedding.png"
    assert written.is_file() and Image.open(written).format == "PNG"
