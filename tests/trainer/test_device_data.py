"""The training set held on the device (trainer/device_data.py, train.data_on_device).

The device path must give the very batches the host path (trainer/pipeline.py ShuffledBatches)
gives, so switching it changes where the data lives, never the result: every image once per epoch
(the remainder dropped), an order fixed by (seed, epoch), a resumed run equal to an uninterrupted
one, and losses equal to the host-fed run's. Under TensorFlow in this process; under JAX in a
subprocess (TensorFlow hidden, as on the GPU machines) on two simulated devices, where Keras'
DataParallel splits each batch.

Tolerances: the two paths feed the same uint8 values (the host path as float32, the device path as
uint8 cast inside the model: the same floats), so on one device the losses agree to float32
rounding (rel 1e-5). Across device counts the reductions add in another order: rel 1e-3 over a
few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.fixtures.training import tiny_config
from tests.jax_subprocess import FAST_XLA, run_under_jax
from tests.trainer.preemption import KillAfterEpoch, Killed
from trainer import accelerator
from trainer.accelerator import bfloat16_supported
from trainer.device_data import DeviceBatches, epoch_permutation, steps_per_execution, use_device_data
from trainer.pipeline import ShuffledBatches
from trainer.train import train


def _images(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256  # each image tells its index
    x[:, 0, 0, 1] = np.arange(n) // 256
    return x, np.arange(n, dtype=np.int32) % 10


def _index(xb: np.ndarray) -> np.ndarray:
    return xb[:, 0, 0, 0].astype(np.int64) + 256 * xb[:, 0, 0, 1].astype(np.int64)


def _take(stream, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    it = iter(stream)
    return [tuple(np.asarray(a) for a in next(it)) for _ in range(k)]


def test_device_batches_are_the_host_batches_each_image_once_per_epoch() -> None:
    x, y = _images(103)  # batch 25: 4 steps per epoch, 3 images dropped each epoch
    host = ShuffledBatches(x, y, 25, seed=7)
    device = DeviceBatches(x, y, 25, seed=7)
    assert device.steps_per_epoch == host.steps_per_epoch == 4
    batches = _take(device.for_fit(), 3 * 4)
    for k, (xb, yb) in enumerate(batches):
        assert xb.dtype == np.uint8 and xb.shape == (25, 32, 32, 3) and yb.dtype == np.int32
        hx, hy = host[k]
        np.testing.assert_array_equal(xb.astype(np.float32), hx)
        np.testing.assert_array_equal(yb, hy)
    epochs = [np.concatenate([_index(b[0]) for b in batches[4 * e : 4 * e + 4]]) for e in range(3)]
    for e, seen in enumerate(epochs):
        assert len(set(seen.tolist())) == 100  # 100 distinct images, none twice
        np.testing.assert_array_equal(seen, epoch_permutation(7, e, 103)[:100])
        np.testing.assert_array_equal(seen, host.order(e)[:100])
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # A run resumed at epoch 2 starts where the uninterrupted one is at epoch 2.
    resumed = _take(DeviceBatches(x, y, 25, seed=7, initial_epoch=2).for_fit(), 4)
    np.testing.assert_array_equal(np.concatenate([_index(b[0]) for b in resumed]), epochs[2])
    other = _take(DeviceBatches(x, y, 25, seed=8).for_fit(), 4)
    assert not np.array_equal(np.concatenate([_index(b[0]) for b in other]), epochs[0])


def test_steps_per_execution_never_crosses_an_epoch_or_a_callback_period() -> None:
    assert steps_per_execution(195) == 15  # 195 = 3 * 5 * 13: largest divisor up to 32
    assert steps_per_execution(48) == 24
    assert steps_per_execution(48, align=[5]) == 1  # airbench: 48 steps/epoch, lookahead every 5
    assert steps_per_execution(50, align=[5]) == 5
    assert steps_per_execution(7) == 7 and steps_per_execution(1) == 1


def test_data_on_device_setting() -> None:
    assert use_device_data("auto", gpus=0) is False  # CPU: today's host-fed path
    assert use_device_data("auto", gpus=1) is True
    assert use_device_data("on", gpus=0) is True and use_device_data("off", gpus=4) is False
    assert use_device_data("auto", gpus=8, processes=2) is False  # each process would feed all
    with pytest.raises(ValueError, match="data_on_device=off or auto"):
        use_device_data("on", gpus=8, processes=2)
    with pytest.raises(ValueError, match="auto, on, off"):
        use_device_data("yes", gpus=0)
    with pytest.raises(ValueError, match="uint8"):
        DeviceBatches(np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, np.int32), 2)


def test_mixed_precision_stays_float32_on_cpu_and_bfloat16_needs_a_device_that_has_it() -> None:
    assert bfloat16_supported() is False  # this CPU: bfloat16 would be emulated
    try:
        assert accelerator.setup("auto").dtype_policy == "float32"
        forced = accelerator.setup("on")  # forced on a CPU: float16 as before, not bfloat16
        assert forced.dtype_policy == "mixed_float16" == keras.mixed_precision.global_policy().name
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _losses(history: list[dict]) -> list[float]:
    return [row["loss"] for row in history]


@pytest.mark.slow
def test_device_path_trains_like_the_host_path_and_resumes(tmp_path: Path) -> None:
    # 4 steps/epoch: steps_per_execution 4, so one call per epoch; cutout + dropout draw random numbers.
    sections = dict(
        data={"num_train": 220, "num_test": 20, "val_fraction": 0.1},
        model={"width": 8, "dropout": 0.1},
        augment={"translate": 2, "flip": True, "cutout": 4},
        train={"epochs": 2, "batch_size": 48},
    )
    host = train(tiny_config(**sections), tmp_path / "host", evaluate=False, log=lambda _m: None)
    on = tiny_config(**{**sections, "train": {**sections["train"], "data_on_device": "on"}})
    lines: list[str] = []
    device = train(on, tmp_path / "device", evaluate=False, log=lines.append)
    assert any("training set in tf.data" in m and "steps_per_execution=4" in m for m in lines), lines
    np.testing.assert_allclose(_losses(device.history), _losses(host.history), rtol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in device.history],
                               [r["val_loss"] for r in host.history], rtol=1e-5)  # fmt: skip

    with pytest.raises(Killed):
        train(on, tmp_path / "killed", callbacks=[KillAfterEpoch(1)], evaluate=False, log=lambda _m: None)
    # Resumed with the data fed from the host (as on a machine without the accelerator): the same
    # batches, so the same run; the setting does not block the resume.
    host_config = tiny_config(**sections)
    resumed = train(host_config, tmp_path / "killed", resume=True, evaluate=False, log=lambda _m: None)
    np.testing.assert_allclose(_losses(resumed.history), _losses(device.history), rtol=1e-5)


# Runs under JAX with two simulated CPU devices (tests/jax_subprocess.py hides TensorFlow).
JAX_SCRIPT = """
import json, sys
import jax, keras, numpy as np
from trainer.config import from_dict
from trainer.device_data import DeviceBatches
from trainer.train import train

assert keras.backend.backend() == "jax" and len(jax.devices()) == 2
base, out = json.loads(sys.argv[1]), sys.argv[2]
x = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
xb, yb = next(iter(DeviceBatches(x, np.arange(20) % 10, 8, seed=1).for_fit()))
# Uncommitted (no distribution here yet): committed inputs would make Keras compile its step twice.
kinds = [type(xb).__name__, str(xb.dtype), str(yb.dtype), xb.committed]

def run(name, **train_section):
    cfg = json.loads(json.dumps(base))
    cfg["train"].update(train_section)
    lines = []
    result = train(from_dict(cfg), f"{out}/{name}", evaluate=False, log=lines.append)
    return {"loss": [r["loss"] for r in result.history], "log": lines}

runs = {
    "host_2dev": run("host_2dev", data_on_device="off"),
    "device_2dev": run("device_2dev", data_on_device="on"),
    "device_1dev": run("device_1dev", data_on_device="on", distribution="off"),
}
json.dump({"kinds": kinds, "runs": runs}, open(f"{out}/result.json", "w"))
"""


@pytest.mark.slow
def test_device_path_under_jax_one_and_two_devices(tmp_path: Path) -> None:
    config = tiny_config(
        data={"num_train": 200, "num_test": 20, "val_fraction": 0.0},
        # The small MLP: XLA compiles it in a fraction of bn_cnn's time (three compiled runs here);
        # the data path is the same for every arch (bn_cnn is trained above under TensorFlow).
        model={"arch": "mlp", "width": 16, "dropout": 0.0},
        augment={"translate": 2, "flip": True, "cutout": 4},
        train={"epochs": 2, "batch_size": 40, "jit_compile": "on"},
    )
    two_devices = {"XLA_FLAGS": f"{FAST_XLA} --xla_force_host_platform_device_count=2"}
    run_under_jax(JAX_SCRIPT, json.dumps(config.to_dict()), str(tmp_path), extra_env=two_devices)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["kinds"] == ["ArrayImpl", "uint8", "int32", False]  # device arrays, never NumPy
    runs = result["runs"]
    assert any("training set on the device" in m for m in runs["device_2dev"]["log"])
    assert any("distribution=data_parallel" in m for m in runs["device_2dev"]["log"])
    assert not any("training set on the device" in m for m in runs["host_2dev"]["log"])
    np.testing.assert_allclose(runs["device_2dev"]["loss"], runs["host_2dev"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(runs["device_1dev"]["loss"], runs["device_2dev"]["loss"], rtol=1e-3)
