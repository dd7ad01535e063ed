"""The trainer under KERAS_BACKEND=jax with TensorFlow unimportable, as it runs on a GPU machine.

GPU machines here have JAX but no TensorFlow, so the trainer must stay backend-agnostic Keras:
this trains in a subprocess where `import tensorflow` fails, then exports the run under TensorFlow
and checks that the SavedModel, loaded the way TF Serving loads it, gives the probabilities the
JAX-trained Keras model gave. That is the path a GPU-trained model takes to production.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.training import tiny_config
from tests.jax_subprocess import run_under_jax

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Runs in the subprocess, TensorFlow hidden (tests/jax_subprocess.py).
TRAIN_WITHOUT_TENSORFLOW = """
import sys
config, run_dir, pixels_path, out_path = sys.argv[1:5]

import keras
import numpy as np

from trainer.cli import main

assert keras.backend.backend() == "jax", keras.backend.backend()
code = main(["train", "--config", config, "--run-dir", run_dir])
if code:
    sys.exit(code)
model = keras.saving.load_model(f"{run_dir}/model.keras")
probabilities = model(np.load(pixels_path), training=False)
np.save(out_path, keras.ops.convert_to_numpy(probabilities))
assert not any(m.split(".")[0] == "tensorflow" for m in sys.modules)
"""


@pytest.fixture(scope="module")
def jax_run(
    tmp_path_factory: pytest.TempPathFactory, reference_pixels: np.ndarray
) -> tuple[Path, np.ndarray]:
    work = tmp_path_factory.mktemp("jax-run")
    config = work / "config.json"
    tiny_config(data={"num_train": 400, "num_test": 100}, train={"epochs": 2}).save(config)
    np.save(work / "pixels.npy", reference_pixels)
    run_dir, out = work / "run", work / "probabilities.npy"
    run_under_jax(TRAIN_WITHOUT_TENSORFLOW, str(config), str(run_dir), str(work / "pixels.npy"), str(out))
    return run_dir, np.load(out)


def test_the_trainer_runs_under_jax_without_tensorflow(jax_run):
    run_dir, probabilities = jax_run
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["keras_backend"] == "jax" and environment["backend_version"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and (run_dir / "reports").is_dir()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_a_jax_trained_run_exports_and_serves_the_same_probabilities(jax_run, reference_pixels, tmp_path):
    from tests.tfserving_session import TFServingSession
    from trainer.export.model_card import read_model_card
    from trainer.export.publish import publish

    run_dir, jax_probabilities = jax_run
    path = publish(run_dir, tmp_path / "models", "cifar10")
    card = read_model_card(path)
    assert card["training_environment"]["keras_backend"] == "jax"
    with TFServingSession.load(path) as session:
        served = session.run("serving_default", {"images": reference_pixels})["probabilities"]
    # The export serves softmax(logits / T) with the temperature it fitted; softmax(log p / T) is the
    # same thing computed from the JAX model's own probabilities.
    scaled = np.log(jax_probabilities.astype(np.float64)) / card["calibration"]["temperature"]
    expected = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    # Same weights, two backends' kernels (XLA on CPU vs TensorFlow's): float32 rounding only.
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_array_equal(served.argmax(axis=1), jax_probabilities.argmax(axis=1))
