"""Distributed training (trainer/distribute.py): every device of a process, and several processes.

* Two simulated JAX devices (XLA_FLAGS=--xla_force_host_platform_device_count=2) train the same
  model as one device: same seed, data order and global batch, per-step losses equal within
  float32 reduction-order noise.
* Two JAX worker processes on 127.0.0.1 (multi-process over gloo) train one model together: their
  final weights are identical, and only the chief (process 0) writes its run directory. Under
  TensorFlow several processes are refused with the reason (Keras 3 cannot run
  MultiWorkerMirroredStrategy, see trainer/distribute.py).
* The Indexed Job environment is parsed strictly: inconsistent values name the variable and the fix.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.training import tiny_config
from tests.jax_subprocess import FAST_XLA, HIDE_TENSORFLOW, PROJECT_ROOT, run_under_jax
from trainer import distribute
from trainer.distribute import Cluster, DistributionError, cluster_from_env

# --- the environment an Indexed Job gives ------------------------------------------------------


def test_no_process_count_means_one_process_even_inside_an_indexed_job() -> None:
    # A parallel-seed Indexed Job sets JOB_COMPLETION_INDEX for its own use: not a process id.
    assert cluster_from_env({"JOB_COMPLETION_INDEX": "3"}) == Cluster()
    assert cluster_from_env({}) == Cluster()


def test_a_consistent_environment_gives_the_cluster() -> None:
    env = {"JOB_COMPLETION_INDEX": "1", "TRAIN_NUM_PROCESSES": "2", "TRAIN_COORDINATOR": "train-0.svc:1234"}
    cluster = cluster_from_env(env)
    assert cluster == Cluster(process_id=1, num_processes=2, coordinator="train-0.svc:1234")
    assert cluster.multi_process and not cluster.is_chief
    assert cluster_from_env({**env, "JOB_COMPLETION_INDEX": "0"}).is_chief


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"JOB_COMPLETION_INDEX": "2", "TRAIN_NUM_PROCESSES": "2", "TRAIN_COORDINATOR": "h-0.s:1"},
         ["JOB_COMPLETION_INDEX=2", "0..1", "TRAIN_NUM_PROCESSES"]),
        ({"JOB_COMPLETION_INDEX": "-1", "TRAIN_NUM_PROCESSES": "2", "TRAIN_COORDINATOR": "h-0.s:1"},
         ["JOB_COMPLETION_INDEX=-1", "0..1"]),
        ({"JOB_COMPLETION_INDEX": "1", "TRAIN_NUM_PROCESSES": "1"}, ["JOB_COMPLETION_INDEX=1", "0..0"]),
        ({"JOB_COMPLETION_INDEX": "0", "TRAIN_NUM_PROCESSES": "2"},
         ["TRAIN_COORDINATOR is not set", "host:port"]),
        ({"TRAIN_NUM_PROCESSES": "2", "TRAIN_COORDINATOR": "h-0.s:1"}, ["JOB_COMPLETION_INDEX is not set"]),
        ({"JOB_COMPLETION_INDEX": "0", "TRAIN_NUM_PROCESSES": "two"},
         ["TRAIN_NUM_PROCESSES='two'", "integer"]),
        ({"JOB_COMPLETION_INDEX": "0", "TRAIN_NUM_PROCESSES": "0"}, ["TRAIN_NUM_PROCESSES=0", ">= 1"]),
        ({"JOB_COMPLETION_INDEX": "x", "TRAIN_NUM_PROCESSES": "2"}, ["JOB_COMPLETION_INDEX='x'", "integer"]),
        ({"JOB_COMPLETION_INDEX": "0", "TRAIN_NUM_PROCESSES": "2", "TRAIN_COORDINATOR": "train-0"},
         ["TRAIN_COORDINATOR='train-0'", "host:port"]),
        ({"JOB_COMPLETION_INDEX": "0", "TRAIN_NUM_PROCESSES": "2", "TRAIN_COORDINATOR": "h:99999"},
         ["TRAIN_COORDINATOR", "1..65535"]),
    ],
)  # fmt: skip
def test_an_inconsistent_environment_names_the_variable_and_the_fix(env: dict, names: list[str]) -> None:
    with pytest.raises(DistributionError) as excinfo:
        cluster_from_env(env)
    for name in names:
        assert name in str(excinfo.value)


def test_several_tensorflow_processes_are_refused_with_the_reason_and_the_fix() -> None:
    import keras

    assert keras.backend.backend() == "tensorflow"
    env = {"JOB_COMPLETION_INDEX": "0", "TRAIN_NUM_PROCESSES": "2", "TRAIN_COORDINATOR": "h-0.s:1"}
    with pytest.raises(DistributionError, match="MultiWorkerMirroredStrategy.*KERAS_BACKEND=jax"):
        distribute.setup("auto", env)


def test_distribution_off_with_several_processes_is_refused() -> None:
    env = {"JOB_COMPLETION_INDEX": "0", "TRAIN_NUM_PROCESSES": "2", "TRAIN_COORDINATOR": "h-0.s:1"}
    with pytest.raises(DistributionError, match="train.distribution=auto or unset TRAIN_NUM_PROCESSES"):
        distribute.setup("off", env)


def test_the_global_batch_must_split_evenly_over_the_devices() -> None:
    dist = distribute.Distribution(distribute.DATA_PARALLEL, devices=4)
    dist.check_batch_size(64)
    with pytest.raises(DistributionError, match="multiple of 4, e.g. 96"):
        dist.check_batch_size(98)


def test_each_process_takes_its_rows_of_every_global_batch() -> None:
    from trainer.pipeline import ArrayBatches

    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    batches = ArrayBatches(x, np.arange(10), batch_size=6)
    shards = [distribute.ProcessShard(batches, p, num_processes=2, devices=2) for p in (0, 1)]
    assert [list(s[0][1]) for s in shards] == [[0, 1, 2], [3, 4, 5]]
    # The short last batch (4 rows) is cut to a multiple of the devices and split the same way.
    assert [list(s[1][1]) for s in shards] == [[6, 7], [8, 9]]
    assert len(shards[0]) == len(batches) == 2


# --- training ----------------------------------------------------------------------------------

# Small: 290 training images, batch 32 -> 9 steps per epoch, 2 epochs; width 8. XLA on: under JAX
# without it Keras runs every op eagerly, several times slower than one compile on this CPU.
TINY = {
    "data": {"num_train": 320, "num_test": 64, "val_fraction": 0.1},
    "model": {"width": 8},
    "train": {"epochs": 2, "batch_size": 32, "verbose": 0, "jit_compile": "on"},
}

# Records the loss of every step: Keras reports the running mean of the epoch at each batch end,
# and step k's own loss is k * mean_k - (k - 1) * mean_(k-1).
RECORDER = """
import keras, numpy as np

class StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses, self._mean = [], 0.0
    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        self.losses.append((batch + 1) * mean - batch * self._mean if batch else mean)
        self._mean = mean
"""

DATA_PARALLEL_RUNS = RECORDER + """
import json, sys
import jax
from trainer import config as config_mod
from trainer.train import train

config_path, work = sys.argv[1:3]
assert len(jax.devices()) == 2, jax.devices()
out = {}
for setting in ("off", "auto"):
    config = config_mod.apply_overrides(config_mod.load(config_path), [f"train.distribution={setting}"])
    recorder = StepLosses()
    result = train(config, f"{work}/{setting}", callbacks=[recorder], evaluate=False, log=lambda m: None)
    environment = json.load(open(f"{work}/{setting}/environment.json"))
    out[setting] = {"losses": recorder.losses, "history": result.history,
                    "distribution": environment["distribution"]}
json.dump(out, open(f"{work}/out.json", "w"))
"""



@pytest.fixture(scope="module")
def one_and_two_devices(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The TINY run on one JAX device and on two simulated ones, in one subprocess."""
    work = tmp_path_factory.mktemp("data-parallel")
    tiny_config(**TINY).save(work / "config.json")
    run_under_jax(DATA_PARALLEL_RUNS, str(work / "config.json"), str(work), timeout=300,
                  extra_env={"XLA_FLAGS": f"{FAST_XLA} --xla_force_host_platform_device_count=2"})
    return json.loads((work / "out.json").read_text())


# Same seed, same batches, same augmentation draws, global-batch BN statistics: runs on 1 and 2
# devices differ only in how float32 sums are split (partial sums per device plus an all-reduce vs
# one sum), ~1e-7 relative per step, compounding through 18 SGD steps to ~1e-6 in the loss (measured:
# 1.7e-6). 1e-4 leaves a wide margin and is still far below what a real difference moves: per-device
# BN statistics, a batch split wrongly (each device a full batch, halved lr) or unshared gradients
# change the loss in the second decimal within a few steps.
LOSS_TOLERANCE = 1e-4


@pytest.mark.slow
def test_two_jax_devices_train_the_model_one_device_trains(one_and_two_devices: dict) -> None:
    one, two = one_and_two_devices["off"], one_and_two_devices["auto"]
    assert one["distribution"]["kind"] == "single" and one["distribution"]["devices"] == 1
    assert two["distribution"]["kind"] == "data_parallel" and two["distribution"]["devices"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 18
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=LOSS_TOLERANCE)
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) < LOSS_TOLERANCE and a["val_accuracy"] == b["val_accuracy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WORKER = RECORDER + """
import json, sys
import numpy as np
from trainer import config as config_mod
from trainer.train import train

config_path, run_dir, out = sys.argv[1:4]
recorder = StepLosses()

class FinalWeights(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        np.savez(out, *[np.asarray(w) for w in self.model.get_weights()])

result = train(config_mod.load(config_path), run_dir, callbacks=[recorder, FinalWeights()],
               log=lambda m: print(m, flush=True))
json.dump(recorder.losses, open(out + ".losses.json", "w"))
"""


def _train_two_jax_workers(tmp_path: Path) -> tuple[list[Path], list[dict]]:
    """Two processes on 127.0.0.1 train one model; each gets its own RUN_DIR (as two pods with their
    own volumes would), so what each writes can be told apart."""
    tiny_config(**TINY).save(tmp_path / "config.json")
    port = _free_port()
    base = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TRAIN_NUM_PROCESSES": "2",
            "TRAIN_COORDINATOR": f"127.0.0.1:{port}", "XLA_FLAGS": FAST_XLA}  # one CPU device each
    procs = []
    for index in (0, 1):
        run_dir, out = tmp_path / f"run{index}", tmp_path / f"weights{index}.npz"
        procs.append(subprocess.Popen(
            # TensorFlow hidden, as on the GPU machines (tests/jax_subprocess.py).
            [sys.executable, "-c", HIDE_TENSORFLOW + WORKER, str(tmp_path / "config.json"), str(run_dir),
             str(out)],
            cwd=PROJECT_ROOT, env={**base, "JOB_COMPLETION_INDEX": str(index)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    weights = [dict(np.load(tmp_path / f"weights{i}.npz")) for i in (0, 1)]
    losses = [json.loads((tmp_path / f"weights{i}.npz.losses.json").read_text()) for i in (0, 1)]
    return [tmp_path / "run0", tmp_path / "run1"], [
        {"weights": w, "losses": loss, "log": log} for w, loss, log in zip(weights, losses, logs, strict=True)
    ]


@pytest.mark.slow
def test_two_jax_processes_train_one_model_and_only_the_chief_writes(
    tmp_path: Path, one_and_two_devices: dict
) -> None:
    run_dirs, (chief, other) = _train_two_jax_workers(tmp_path)
    assert len(chief["weights"]) == len(other["weights"]) > 0
    for key in chief["weights"]:
        np.testing.assert_array_equal(chief["weights"][key], other["weights"][key])
    # One model: the same global steps, each process feeding half of each global batch, so the
    # losses are the one-device run's (same tolerance as above).
    assert chief["losses"] == other["losses"]
    single = one_and_two_devices["off"]["losses"]
    np.testing.assert_allclose(chief["losses"], single, rtol=0, atol=LOSS_TOLERANCE)
    for name in ("config.json", "model.keras", "metrics.json", "history.csv", "checkpoints/state.json",
                 "checkpoints/last.keras", "environment.json"):
        assert (run_dirs[0] / name).is_file(), name
    assert (run_dirs[0] / "reports").is_dir()
    environment = json.loads((run_dirs[0] / "environment.json").read_text())
    assert environment["distribution"]["num_processes"] == 2
    assert not run_dirs[1].exists() or not any(run_dirs[1].iterdir()), sorted(run_dirs[1].rglob("*"))
    # The non-chief trained into a scratch directory (its log says where) and deleted it at the end.
    scratch = re.search(r"\) into (\S+)", other["log"]).group(1)
    assert "trainer-worker1-" in scratch and not Path(scratch).exists()


def test_a_non_chief_writes_a_scratch_copy_and_deletes_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    files = (("config.json", "{}"), ("checkpoints/state.json", '{"checkpoint": "epoch-0002.keras"}'),
             ("checkpoints/epoch-0002.keras", "weights"), ("checkpoints/epoch-0001.keras", "old"))
    for name, text in files:
        (run_dir / name).write_text(text)
    chief = distribute.Distribution(distribute.DATA_PARALLEL, Cluster(0, 2, "h-0.s:1"), devices=2)
    assert chief.output_dir(run_dir, {"checkpoint": "epoch-0002.keras"}) == run_dir
    other = distribute.Distribution(distribute.DATA_PARALLEL, Cluster(1, 2, "h-0.s:1"), devices=2)
    scratch = other.output_dir(run_dir, {"checkpoint": "epoch-0002.keras"})
    assert scratch != run_dir and not scratch.is_relative_to(run_dir)
    # What resuming reads, copied from the chief's RUN_DIR (shared storage); nothing more.
    copied = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.is_file())
    assert copied == ["checkpoints/epoch-0002.keras", "checkpoints/state.json", "config.json"]
    other.close()
    assert not scratch.exists() and (run_dir / "checkpoints/epoch-0002.keras").is_file()
