"""Batch-norm folding at export (trainer/export/savedmodel.py): the served graph has no batch norm left
and still computes the Keras model's probabilities.

The model's batch norms get random statistics, as training leaves them: an untrained batch norm
(mean 0, variance 1, gamma 1, beta 0) is nearly the identity, and would hide a wrong fold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def model():
    import keras

    from trainer.models import build_model

    keras.utils.set_random_seed(3)
    model = build_model("bn_cnn", num_classes=len(CLASSES), mean=[120.0] * 3, std=[60.0] * 3, width=8)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, channels).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.05, 3.0, channels).astype("float32"))
            layer.gamma.assign(rng.uniform(0.3, 2.0, channels).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.5, channels).astype("float32"))
    return model


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    import tensorflow as tf

    from trainer.export.savedmodel import export_savedmodel

    directory = export_savedmodel(model, CLASSES, tmp_path_factory.mktemp("fold") / "1")
    return tf.saved_model.load(str(directory))


def test_fold_removes_every_batch_norm_and_keeps_the_function(model, pixels) -> None:
    import keras

    from trainer.export.savedmodel import fold_batch_norm

    folded = fold_batch_norm(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    convs = [layer for layer in folded.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 6 and all(conv.use_bias for conv in convs)
    assert folded.get_layer("last_conv") is not None  # Grad-CAM's layer keeps its name
    expected = np.asarray(model(pixels, training=False))
    np.testing.assert_allclose(np.asarray(folded(pixels, training=False)), expected, atol=1e-6, rtol=0)
    # The original is untouched: its batch norms still hold their statistics.
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == 6


def test_pixel_signature_matches_the_keras_model_within_1e_5(model, exported, pixels) -> None:
    import tensorflow as tf

    out = exported.signatures["serving_default"](images=tf.constant(pixels))
    expected = np.asarray(model(pixels, training=False))
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5, rtol=0)
    # Explain runs the same folded graph: its probabilities are serving_default's.
    explained = exported.signatures["explain"](
        images=tf.constant(pixels), class_index=tf.constant([-1] * len(pixels), tf.int32)
    )
    np.testing.assert_allclose(explained["probabilities"].numpy(), out["probabilities"].numpy(), atol=1e-6)


def test_the_served_graph_holds_no_batch_norm_statistics(model, exported, tmp_path: Path) -> None:
    """Folded: the SavedModel has no moving mean/variance left to read on every call; unfolded
    (fold_bn=False, what benchmarks/bn_folding.py compares with) it has one pair per conv block."""
    import tensorflow as tf

    from trainer.export.savedmodel import export_savedmodel

    def statistics(saved_model) -> list[str]:
        return [v.name for v in saved_model.variables if "moving_" in v.name]

    assert statistics(exported) == []
    unfolded = tf.saved_model.load(str(export_savedmodel(model, CLASSES, tmp_path / "1", fold_bn=False)))
    assert len(statistics(unfolded)) == 12


def test_a_model_without_batch_norm_is_exported_as_it_is() -> None:
    import keras

    from trainer.export.savedmodel import fold_batch_norm
    from trainer.models import build_model

    plain = build_model("mlp", num_classes=3, mean=[0.0] * 3, std=[1.0] * 3)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in plain.layers)
    assert fold_batch_norm(plain) is plain
