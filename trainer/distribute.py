"""Where a run trains: one device, every device of a node, or several processes (nodes) together.

Chosen from the devices and the environment, before the model is built (`setup`):

  backend     one process, one device   one process, N devices           several processes
  jax         plain Keras               keras.distribution.DataParallel  keras.distribution.initialize
                                        over all local devices           + DataParallel over all devices
  tensorflow  plain Keras               tf.distribute.MirroredStrategy   refused (below)
                                        (N GPUs)

Several processes under TensorFlow (MultiWorkerMirroredStrategy) are refused with the reason: Keras
3's TensorFlow fit cannot run that strategy (it reduces the scalar step logs with
strategy.reduce("MEAN", scalar, axis=0), which raises "Invalid reduction dimension 0 for input with
0 dimensions"; tensorflow/tensorflow#72388, reproduced here with Keras 3.15 / TF 2.21, whose answer
is legacy Keras 2). Several nodes train under JAX, the backend the GPU machines run.

Several processes are configured by the environment a Kubernetes Indexed Job gives each pod
(k8s/training-multinode/):

  TRAIN_NUM_PROCESSES   how many processes train the model together. Unset: one process, and
                        JOB_COMPLETION_INDEX is then NOT a process id (a parallel-seed Indexed Job
                        sets it for its own use).
  JOB_COMPLETION_INDEX  this process's id, 0..N-1 (Kubernetes sets it in an Indexed Job).
  TRAIN_COORDINATOR     host:port of process 0 (its pod through the Job's headless Service), e.g.
                        train-0.train-workers:12355: jax.distributed's coordinator, which process 0
                        serves and the others dial.

Definitions that do not depend on the device count (so 1 and N devices train the same model):
- `train.batch_size` is the GLOBAL batch, summed over every device of every process; each of the
  D devices computes B / D images per step (B must divide evenly: checked, with the fix named).
  The loss is averaged over the global batch and the gradients are averaged over the devices, so
  the learning rate (and `optim.lr_batch_size` scaling, trainer/optimizers.py) refers to B.
- Batch-norm statistics are those of the GLOBAL batch (synchronised BN), not per-device statistics
  as PyTorch DDP without SyncBatchNorm computes them. Under JAX this holds by construction: the
  model is one program over the global, batch-sharded array and XLA inserts the cross-device
  reductions for the mean and variance. Under TensorFlow's MirroredStrategy, BatchNormalization
  layers are switched to `synchronized=True` (an all-reduce per BN layer per step; not measured on a
  GPU); a model saved from such a run carries that flag, which only TensorFlow loads (export runs
  under TensorFlow anyway).
- Random augmentation and dropout draw the same numbers for the global batch whatever the device
  count (JAX's partitionable threefry), so a 2-device run repeats the 1-device run up to the order
  of float32 additions in the reductions (tests/trainer/test_distribute.py states the tolerance).
- Under JAX's DataParallel, validation batches are cut to a multiple of the device count (every
  device needs an equal share): a short last batch loses at most D-1 images from the validation
  score. (MirroredStrategy splits a short batch unevenly itself. The test-split report,
  trainer/evaluate.py, runs on the chief alone without a distribution and sees every image.)

Only the chief (process 0) writes the run directory (checkpoints, history, reports, model files).
Every other process runs the same callbacks into a scratch directory (early stopping must decide
the same everywhere, and a save may read every process's share of a variable) and deletes it at
the end. Resuming several processes needs RUN_DIR on storage every process reads
(ReadWriteMany), since each restores the chief's checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

ENV_INDEX = "JOB_COMPLETION_INDEX"
ENV_COORDINATOR = "TRAIN_COORDINATOR"
ENV_NUM_PROCESSES = "TRAIN_NUM_PROCESSES"
SETTINGS = ("auto", "off")  # train.distribution

# Kinds of distribution (Distribution.kind, recorded in environment.json).
SINGLE = "single"  # one device
DATA_PARALLEL = "data_parallel"  # JAX: keras.distribution.DataParallel (one or several processes)
MIRRORED = "mirrored"  # TensorFlow: MirroredStrategy over the GPUs of this process


class DistributionError(ValueError):
    """An environment or setting that cannot start distributed training; names the fix."""


@dataclass(frozen=True)
class Cluster:
    """This process's place among the processes that train one model."""

    process_id: int = 0
    num_processes: int = 1
    coordinator: str | None = None  # host:port of process 0; None for one process

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1

    @property
    def is_chief(self) -> bool:
        return self.process_id == 0


def _int_env(environ: Mapping[str, str], name: str, fix: str) -> int:
    raw = environ[name].strip()
    try:
        return int(raw)
    except ValueError:
        raise DistributionError(f"{name}={raw!r} is not an integer; {fix}") from None


def _check_address(name: str, address: str) -> str:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributionError(
            f"{name}={address!r} must be host:port (e.g. train-0.train-workers:12355), with a port 1..65535"
        )
    return f"{host}:{port}"


def cluster_from_env(environ: Mapping[str, str] | None = None) -> Cluster:
    """The cluster the environment describes (see the module docstring); one process when
    TRAIN_NUM_PROCESSES is unset. Inconsistent values raise DistributionError naming the variable."""
    env = os.environ if environ is None else environ
    if not env.get(ENV_NUM_PROCESSES, "").strip():
        return Cluster()  # JOB_COMPLETION_INDEX alone is a parallel-seed job's index, not a process id
    count = _int_env(env, ENV_NUM_PROCESSES, "set it to the number of processes (the Job's completions)")
    if count < 1:
        raise DistributionError(f"{ENV_NUM_PROCESSES}={count} must be >= 1 (the Job's completions)")
    if not env.get(ENV_INDEX, "").strip():
        if count == 1:
            return Cluster()
        raise DistributionError(
            f"{ENV_INDEX} is not set but {ENV_NUM_PROCESSES}={count}: each process needs its id "
            f"0..{count - 1}; an Indexed Job (completionMode: Indexed) sets it, elsewhere export it"
        )
    index = _int_env(env, ENV_INDEX, f"set it to this process's id, 0..{count - 1}")
    if not 0 <= index < count:
        raise DistributionError(
            f"{ENV_INDEX}={index} is outside 0..{count - 1} ({ENV_NUM_PROCESSES}={count}); set "
            f"{ENV_NUM_PROCESSES} to the Job's completions (= parallelism) so every index has a place"
        )
    if count == 1:
        return Cluster()
    coordinator = env.get(ENV_COORDINATOR, "").strip()
    if not coordinator:
        raise DistributionError(
            f"{ENV_COORDINATOR} is not set but {ENV_NUM_PROCESSES}={count}: set it to host:port of process 0 "
            "(its pod through the Job's headless Service, e.g. train-0.train-workers:12355)"
        )
    coordinator = _check_address(ENV_COORDINATOR, coordinator)
    return Cluster(process_id=index, num_processes=count, coordinator=coordinator)


class ProcessShard(keras.utils.PyDataset):
    """This process's rows of every global batch from `batches`, for JAX's DataParallel.

    Keras assembles the global batch from each process's rows in process order
    (jax.make_array_from_process_local_data), so process p takes rows [p*b, (p+1)*b) of each global
    batch, b = rows / processes. Rows are first cut to a multiple of `devices` (every device gets an
    equal share); training batches already are (checked before training).
    """

    def __init__(self, batches: keras.utils.PyDataset, process_id: int, num_processes: int,
                 devices: int) -> None:
        super().__init__()
        self.batches = batches
        self.process_id, self.num_processes, self.devices = process_id, num_processes, devices

    @property
    def num_batches(self) -> int | None:
        return self.batches.num_batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        arrays = self.batches[index]
        rows = len(arrays[0]) - len(arrays[0]) % self.devices
        share = rows // self.num_processes
        start = self.process_id * share
        return tuple(a[start : start + share] for a in arrays)


@dataclass
class Distribution:
    """The distribution a run uses; `setup` builds it. Enter `scope()` to build the model."""

    kind: str
    cluster: Cluster = field(default_factory=Cluster)
    devices: int = 1  # devices the global batch is split over, all processes together
    strategy: Any = None  # TensorFlow's tf.distribute strategy
    keras_distribution: Any = None  # JAX: the keras.distribution.DataParallel set globally
    _scratch: Path | None = None

    @property
    def is_chief(self) -> bool:
        return self.cluster.is_chief

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """Where variables are created: the TensorFlow strategy's scope. Under JAX the distribution
        is set globally by `setup` (Keras' JAX trainer reads it in fit, outside any scope)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.devices:
            raise DistributionError(
                f"train.batch_size={batch_size} does not split evenly over {self.devices} devices "
                f"({self.describe()}); use a multiple of {self.devices}, e.g. "
                f"{max(self.devices, batch_size - batch_size % self.devices)}"
            )

    def prepare_model(self, model: keras.Model) -> None:
        """Global-batch BN statistics under TensorFlow's MirroredStrategy (see the module
        docstring); call before the first training step."""
        if self.strategy is None:
            return
        for layer in model._flatten_layers():  # Keras' own walk over nested layers
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True

    def training_input(self, batches: keras.utils.PyDataset) -> Any:
        """What fit takes for the training (or validation) batches of `batches` (global batches)."""
        if self.kind == DATA_PARALLEL:
            return ProcessShard(batches, self.cluster.process_id, self.cluster.num_processes, self.devices)
        # One device, or MirroredStrategy: Keras' TF trainer splits each global batch over the
        # replicas itself (strategy.experimental_distribute_dataset in TFEpochIterator).
        return batches

    def output_dir(self, run_dir: Path, resume_state: Mapping[str, Any] | None) -> Path:
        """Where this process writes: RUN_DIR on the chief; elsewhere a scratch directory holding a
        copy of what resuming reads (config.json, state.json and its checkpoint)."""
        if self.is_chief:
            return run_dir
        from trainer import run_files  # trainer.run_files imports the data loaders: only when needed
        from trainer.checkpoints import STATE_FILE

        self._scratch = Path(tempfile.mkdtemp(prefix=f"trainer-worker{self.cluster.process_id}-"))
        if resume_state is not None:
            (self._scratch / run_files.CHECKPOINTS_DIR).mkdir()
            names = [run_files.CONFIG_FILE, f"{run_files.CHECKPOINTS_DIR}/{STATE_FILE}",
                     f"{run_files.CHECKPOINTS_DIR}/{resume_state.get('checkpoint', 'last.keras')}"]
            for name in names:
                if (run_dir / name).is_file():
                    shutil.copyfile(run_dir / name, self._scratch / name)
        return self._scratch

    def close(self) -> None:
        """Unset the global distribution (later models in this process are plain again) and delete
        a non-chief's scratch directory. The process group itself lives until the process exits."""
        if self.keras_distribution is not None:
            if keras.distribution.distribution() is self.keras_distribution:
                keras.distribution.set_distribution(None)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def describe(self) -> str:
        where = f"process {self.cluster.process_id}/{self.cluster.num_processes}"
        return f"distribution={self.kind} devices={self.devices} ({where})"

    def environment(self) -> dict[str, Any]:
        return {"kind": self.kind, "devices": self.devices, "num_processes": self.cluster.num_processes,
                "process_id": self.cluster.process_id, "batch_norm": "global-batch statistics"}


_initialized: Cluster | None = None  # a process joins its process group once


def _initialize_jax(cluster: Cluster) -> None:
    global _initialized
    if _initialized is not None:
        if _initialized != cluster:
            raise DistributionError(f"this process already joined {_initialized}; cannot join {cluster}")
        return
    import jax

    # Cross-process collectives on CPU need an implementation (gloo); GPUs use NCCL regardless.
    # jax 0.10 defaults to gloo; older versions default to none, where the first all-reduce fails.
    if jax.config.values.get("jax_cpu_collectives_implementation") in (None, "none", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Wraps jax.distributed.initialize (blocks until all processes reached the coordinator).
    keras.distribution.initialize(cluster.coordinator, cluster.num_processes, cluster.process_id)
    _initialized = cluster


def _setup_jax(cluster: Cluster) -> Distribution:
    import jax

    if cluster.multi_process:
        _initialize_jax(cluster)
    devices = jax.devices()  # all processes' devices of the default platform (GPUs when present)
    if len(devices) == 1:
        return Distribution(SINGLE, cluster)
    # Each process feeds its own rows (ProcessShard), so Keras must not shard a tf.data input again.
    data_parallel = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices(), auto_shard_dataset=False
    )
    keras.distribution.set_distribution(data_parallel)
    return Distribution(DATA_PARALLEL, cluster, devices=len(devices), keras_distribution=data_parallel)


def _setup_tensorflow(cluster: Cluster) -> Distribution:
    import tensorflow as tf  # under the TensorFlow backend only

    if cluster.multi_process:
        raise DistributionError(
            f"{ENV_NUM_PROCESSES}={cluster.num_processes} under KERAS_BACKEND=tensorflow: Keras 3's "
            "TensorFlow fit cannot run MultiWorkerMirroredStrategy (its step-log reduction raises "
            "'Invalid reduction dimension 0 for input with 0 dimensions', tensorflow/tensorflow#72388); "
            "train several processes with KERAS_BACKEND=jax, or one process per node under TensorFlow"
        )
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:  # not measured on a GPU here
        strategy = tf.distribute.MirroredStrategy()
        return Distribution(MIRRORED, cluster, devices=strategy.num_replicas_in_sync, strategy=strategy)
    return Distribution(SINGLE, cluster)


def setup(setting: str = "auto", environ: Mapping[str, str] | None = None) -> Distribution:
    """Choose and enter the distribution; call first in a training process, before any model or
    backend computation (MultiWorkerMirroredStrategy and jax.distributed require it).

    setting: train.distribution. auto = every device of this process and, when the environment
    names several processes, all of them; off = one device (refused when several processes are
    configured: they would each train alone).
    """
    if setting not in SETTINGS:
        raise DistributionError(f"train.distribution must be one of {', '.join(SETTINGS)}, got {setting!r}")
    cluster = cluster_from_env(environ)
    if keras.backend.backend() == "jax":
        # A distribution left set by an earlier run in this process (one that raised) must not leak.
        keras.distribution.set_distribution(None)
    if setting == "off":
        if cluster.multi_process:
            raise DistributionError(
                f"train.distribution=off but {ENV_NUM_PROCESSES}={cluster.num_processes}: the processes "
                f"would each train their own model; set train.distribution=auto or unset {ENV_NUM_PROCESSES}"
            )
        return Distribution(SINGLE, cluster)
    backend = keras.backend.backend()
    if backend == "jax":
        return _setup_jax(cluster)
    if backend == "tensorflow":
        return _setup_tensorflow(cluster)
    if cluster.multi_process:
        raise DistributionError(
            f"several processes ({ENV_NUM_PROCESSES}={cluster.num_processes}) need KERAS_BACKEND=jax or "
            f"tensorflow, not {backend}"
        )
    return Distribution(SINGLE, cluster)
