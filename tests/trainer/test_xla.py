"""Every shipped profile's model really compiles with XLA, under TensorFlow and under JAX.

Keras does not fail when a model holds a layer XLA cannot compile: it warns and sets
`model.jit_compile = False`, and the GPU profiles then train op by op. So these tests build the
model of each configs/*.yaml exactly as the config describes it, compile with jit_compile=True,
assert Keras kept XLA on, and take one XLA-compiled training step. `xla_blockers` names the
layers that would switch it off, for the trainer's clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.jax_subprocess import run_under_jax
from trainer import config as config_lib
from trainer.models import build_model, xla_blockers, xla_error

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))
MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


def _profile_model(path: Path, width: int | None = None) -> keras.Model:
    """The profile's model as its config builds it; `width` shrinks it (same layers, fewer channels)."""
    config = config_lib.load(path)
    m = config.model
    return build_model(
        m.arch, num_classes=10, mean=MEAN, std=STD, augmentation=config.augment, width=width or m.width,
        dropout=m.dropout, bn_momentum=config.optim.bn_momentum, init=m.init, head_bias=m.head_bias,
    )  # fmt: skip


def _compile(model: keras.Model) -> None:
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
        loss="sparse_categorical_crossentropy",
        jit_compile=True,
    )


def test_the_shipped_profiles_are_the_ones_tested() -> None:
    assert {p.name for p in PROFILES} >= {"default.yaml", "quick.yaml", "resnet9.yaml"}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_compiles_with_xla_under_tensorflow(profile: Path) -> None:
    model = _profile_model(profile)
    assert xla_blockers(model) == [] and xla_error(model) is None
    _compile(model)
    assert model.jit_compile is True


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_takes_an_xla_training_step_under_tensorflow(profile: Path) -> None:
    keras.utils.set_random_seed(0)
    # Width 4: the layer types, not their channel counts, decide what XLA compiles; CPU time is scarce.
    model = _profile_model(profile, width=4)
    _compile(model)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    loss = model.train_on_batch(x, np.arange(4) % 10)
    assert np.isfinite(loss)
    assert model.jit_compile is True  # still on once the train function was built


def test_a_layer_xla_cannot_compile_is_named_with_its_fix() -> None:
    # Keras' RandomRotation (augment.rotation > 0) does not support XLA.
    model = build_model("bn_cnn", num_classes=10, mean=MEAN, std=STD, width=4,
                        augmentation={"translate": 4, "cutout": 8, "rotation": 10.0, "brightness": 0.1})
    assert xla_blockers(model) == ["aug_rotate"]
    message = xla_error(model)
    assert message is not None
    assert "'aug_rotate' (RandomRotation): set augment.rotation=0" in message
    assert "train.jit_compile=off" in message
    # What the error guards against: Keras silently trains such a model without XLA.
    with pytest.warns(UserWarning, match="jit_compile"):
        _compile(model)
    assert model.jit_compile is False


# Runs in a subprocess with KERAS_BACKEND=jax and TensorFlow unimportable (as on the GPU machines).
JAX_PROFILES = """
import json
import sys

import keras
import numpy as np

from tests.trainer.test_xla import PROFILES, _compile, _profile_model
from trainer.models import xla_blockers

assert keras.backend.backend() == "jax", keras.backend.backend()
results = {}
for profile in PROFILES:
    keras.utils.set_random_seed(0)
    blockers = xla_blockers(_profile_model(profile))
    model = _profile_model(profile, width=4)  # the same layers, cheaper to compile on a CPU
    _compile(model)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    loss = float(model.train_on_batch(x, np.arange(4) % 10))
    results[profile.stem] = {"blockers": blockers, "jit_compile": model.jit_compile, "loss": loss}
assert not any(m.split(".")[0] == "tensorflow" for m in sys.modules)
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.slow
def test_every_profile_keeps_xla_on_under_jax() -> None:
    result = run_under_jax(JAX_PROFILES, timeout=900)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert sorted(results) == [p.stem for p in PROFILES]
    for name, r in results.items():
        assert r["blockers"] == [] and r["jit_compile"] is True, (name, r)
        assert np.isfinite(r["loss"]), (name, r)
