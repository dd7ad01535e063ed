"""The training set held on the accelerator: uint8 images in device memory, one compiled call per epoch.

`DeviceBatches` is the device-held counterpart of trainer/pipeline.py's `ShuffledBatches`: the same
batches in the same order (batch k of epoch e holds the images that `ShuffledBatches` puts there:
the permutation NumPy draws from (seed, epoch), remainder dropped), so `train.data_on_device` changes
where the pixels live and what copies them, never the result. What differs:

- The images stay uint8 (a quarter of the float32 bytes) and the model casts them: its Input is
  float32, and Keras' Functional model converts inputs to that dtype inside the compiled step.
- Each epoch's shuffle is one call: the host draws the permutation (4 bytes per image, 1.6 ms for
  50,000 images with NumPy on this CPU, once per epoch) and one compiled gather reorders the uint8
  images and labels and cuts them into the epoch's batches. Device memory: twice the uint8 set (the
  set and the current epoch's batches), 300 MiB for CIFAR-10's 50,000 images.
- Augmentation is NOT moved: it stays inside the model (trainer/models/augment.py), compiled into
  the training step on the device, seeded as before, and off at inference. Moving it into the epoch
  call (as airbench does) would change the random streams and the model contract for no device
  benefit: both places are compiled device code.
- `steps_per_execution` (compile's argument, set on the model by `configure`) runs several steps per
  call from Keras' loop: the largest divisor of steps per epoch up to MAX_STEPS_PER_EXECUTION, because
  Keras pulls steps_per_execution batches per call and a call that straddled two epochs would shift
  every later epoch's batches; and a divisor of the period of any callback acting every n steps
  (airbench's Lookahead, every 5 steps: there it is 1 or 5), since callbacks see only the last batch
  of each execution. Same numbers as 1 step per call; only the Python and callback overhead falls.

How each backend's `model.fit` consumes this (Keras 3.15, keras/src/trainers and backend/*/trainer.py):

- JAX (the GPU machines): the training set is put on the default device once (`jax.device_put`,
  uncommitted like the batches Keras itself puts there, else the step compiles twice); each epoch
  one `jax.jit` call gathers and splits it into `steps_per_epoch` device arrays; fit gets a Python
  generator yielding them (GeneratorDataAdapter passes jax.Array through unchanged, and
  JAXEpochIterator's `device_put` of an array already on its device is a no-op). No host copy per step.
  What remains on the host per step is Keras' own: the JAX trainer runs `steps_per_execution` as a
  Python loop calling the jitted step once per batch (backend/jax/trainer.py `_make_function`), so
  each step is one generator `next` (handing over an existing device buffer) plus one asynchronous
  dispatch; callbacks run once per execution. Avoiding that would need our own training loop
  (or a custom `train_step` scanning over steps), which this project does not take on.
  Under a single-process `keras.distribution` (DataParallel), the training set is replicated on
  every device and the epoch call writes each batch already split along the batch axis (the
  distribution's data layout), so Keras' `device_put` onto that layout is again a no-op.
  Several processes: `auto` keeps the host path (trainer/distribute.py's per-process shards), `on`
  is refused: each process would feed the whole global batch.
- TensorFlow: fit takes a `tf.data.Dataset` (TFDatasetAdapter) and with steps_per_execution > 1 runs
  the steps in a `tf.while_loop` inside one `tf.function`: no Python per step at all. But tf.data
  runs on the host CPU, so the training set (uint8) lives in host memory and each step's uint8 batch
  is gathered by tf.data's C++ threads and copied to the GPU by the runtime: no Python and no float32
  conversion on the host, but not device-resident. Keeping it on a GPU under TF would need a custom
  `train_step` gathering from a device variable. TensorFlow is not what the GPU machines run.

Not measured on a GPU (none was lent to this work); on CPU both paths are measured by
benchmarks/train_throughput.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np

# Upper bound on compile's steps_per_execution: steps run per call from Keras' loop. More steps per
# call amortise the callback and dispatch overhead; 32 is where it stops mattering (Keras' guides use
# 32-64) while the progress bar and a stop request still react within a second at GPU speed.
MAX_STEPS_PER_EXECUTION = 32

SETTINGS = ("auto", "on", "off")


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of epoch `epoch`: the very draw ShuffledBatches.order makes (tests check they agree)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def steps_per_execution(
    steps_per_epoch: int, limit: int = MAX_STEPS_PER_EXECUTION, align: Sequence[int] = ()
) -> int:
    """The largest divisor of `steps_per_epoch` up to `limit` (executions never cross an epoch) that
    also divides every period in `align`: callbacks acting every n steps (airbench's Lookahead) see
    the batch ends of one execution only, so n must be a multiple of steps_per_execution for them to
    act at the same steps as with 1."""
    return max(
        d for d in range(1, min(limit, steps_per_epoch) + 1)
        if steps_per_epoch % d == 0 and all(n % d == 0 for n in align)
    )


def use_device_data(setting: str, gpus: int, processes: int = 1) -> bool:
    """Resolve train.data_on_device: auto = on when a GPU is present (off on CPU, today's path).

    processes: how many processes train the model together (trainer/distribute.py's cluster).
    Refuses `on` where it cannot work (the torch backend, several processes); `auto` falls back.
    """
    if setting not in SETTINGS:
        raise ValueError(f"train.data_on_device must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting == "off":
        return False
    problem = None
    if keras.backend.backend() not in ("jax", "tensorflow"):
        problem = f"the {keras.backend.backend()} backend is not supported (use jax or tensorflow)"
    elif processes > 1:
        problem = (f"{processes} processes train together and each would feed the whole global batch "
                   "(each process must hold its own shard)")
    if problem is not None:
        if setting == "on":
            raise ValueError(f"train.data_on_device=on: {problem}; set train.data_on_device=off or auto")
        return False
    return setting == "on" or gpus > 0


def _gather_batches(x: Any, y: Any, order: Any, steps: int, batch_size: int) -> list[tuple[Any, Any]]:
    """The epoch's batches from the images in `order`: one gather, then split along the step axis."""
    index = keras.ops.reshape(order[: steps * batch_size], (steps, batch_size))
    xs = keras.ops.take(x, index, axis=0)  # [steps, batch, H, W, C] uint8
    ys = keras.ops.take(y, index, axis=0)
    return [(xs[i], ys[i]) for i in range(steps)]


class DeviceBatches:
    """Endless training batches (x uint8 [B,H,W,C], y int32 [B]) from a training set held on the device.

    Batch k belongs to epoch initial_epoch + k // steps_per_epoch and holds exactly what
    ShuffledBatches(x, y, batch_size, seed=seed, initial_epoch=initial_epoch)[k] holds (as uint8).
    `for_fit()` is what model.fit takes (with steps_per_epoch=self.steps_per_epoch, shuffle=False).
    """

    def __init__(
        self, x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int = 0, initial_epoch: int = 0
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"images and labels differ in length: {len(x)} vs {len(y)}")
        if len(x) == 0:
            raise ValueError("cannot build batches from an empty split")
        if x.dtype != np.uint8:
            # uint8 is the point (4x less device memory than float32) and what the data loaders give.
            raise ValueError(f"device-held images must be uint8 pixels 0..255, got {x.dtype}")
        self.x, self.y = x, y.astype(np.int32)
        self.batch_size = min(int(batch_size), len(x))
        self.steps_per_epoch = len(x) // self.batch_size
        self.seed = int(seed)
        self.initial_epoch = int(initial_epoch)
        self.backend = keras.backend.backend()
        if self.backend not in ("jax", "tensorflow"):
            raise ValueError(f"data on the device needs the jax or tensorflow backend, not {self.backend}")
        self._jax: tuple[Any, ...] | None = None  # (placement, x, y, compiled epoch call), made once
        self._tf: tuple[Any, Any] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Image indices of the epoch's batches, in order (int32 [steps_per_epoch * batch_size])."""
        perm = epoch_permutation(self.seed, epoch, len(self.x))
        return perm[: self.steps_per_epoch * self.batch_size].astype(np.int32)

    def configure(self, model: keras.Model, align: Sequence[int] = ()) -> int:
        """Set the compiled model's steps_per_execution for this stream (before fit); returns it.
        align: periods, in steps, of callbacks that act every n steps (see steps_per_execution)."""
        model.steps_per_execution = steps_per_execution(self.steps_per_epoch, align=align)
        return model.steps_per_execution

    def for_fit(self, initial_epoch: int | None = None) -> Any:
        """The stream for model.fit: a generator of device arrays (JAX) or a tf.data.Dataset (TF),
        from `initial_epoch` (default: the one given at construction). The device copy of the set
        and the compiled epoch call are made once per DeviceBatches and reused by later streams."""
        start = self.initial_epoch if initial_epoch is None else int(initial_epoch)
        return self._jax_stream(start) if self.backend == "jax" else self._tf_dataset(start)

    # JAX: the set on the device once, one jitted gather-and-split per epoch, buffers handed to fit.
    def _jax_stream(self, start: int) -> Iterator[tuple[Any, Any]]:
        import jax

        steps, batch = self.steps_per_epoch, self.batch_size
        placed, image_sharding, label_sharding = _jax_placement(self.x.shape[1:], batch)
        if self._jax is None or self._jax[0] != placed:  # once, and again if the distribution changed
            out = None if image_sharding is None else [(image_sharding, label_sharding)] * steps
            epoch_batches = jax.jit(
                lambda x, y, order: _gather_batches(x, y, order, steps, batch), out_shardings=out
            )
            x, y = jax.device_put(self.x, placed), jax.device_put(self.y, placed)
            self._jax = (placed, x, y, epoch_batches)
        _, x, y, epoch_batches = self._jax

        def stream() -> Iterator[tuple[Any, Any]]:
            epoch = start
            while True:
                # Asynchronous: the host queues the gather and hands its (future) outputs to fit.
                yield from epoch_batches(x, y, jax.device_put(self.order(epoch), placed))
                epoch += 1

        return stream()

    # TensorFlow: tf.data from the uint8 set, the permutation drawn once per epoch (see the docstring).
    def _tf_dataset(self, start: int) -> Any:
        import tensorflow as tf

        steps, batch = self.steps_per_epoch, self.batch_size
        if self._tf is None:
            self._tf = (tf.constant(self.x), tf.constant(self.y))
        x, y = self._tf

        def epoch_order(epoch: Any) -> Any:
            order = tf.numpy_function(lambda e: self.order(int(e)), [epoch], tf.int32, stateful=False)
            return tf.reshape(order, (steps, batch))

        def gather(index: Any) -> tuple[Any, Any]:
            return tf.gather(x, index), tf.gather(y, index)

        dataset = (
            tf.data.Dataset.range(start, 2**62)  # endless: fit's steps_per_epoch cuts epochs
            .map(epoch_order)
            .flat_map(tf.data.Dataset.from_tensor_slices)
            .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
        )
        return dataset


def _jax_placement(image_shape: tuple[int, ...], batch_size: int) -> tuple[Any, Any, Any]:
    """(where the training set goes, the sharding of each image batch, of each label batch) under
    the current keras.distribution: with one, the set is replicated on its mesh and the batches are
    split as its data layout says (what Keras would device_put them to); without, one device, None."""
    import jax

    distribution = keras.distribution.distribution()
    if distribution is None:
        # The default device, uncommitted (device_put without a device): arrays committed to a
        # device make the jitted train step's outputs committed too, so the model state changes
        # kind after the first epoch and Keras' train step compiles a second time.
        return None, None, None
    images = distribution.get_data_layout((batch_size, *image_shape)).backend_layout
    labels = distribution.get_data_layout((batch_size,)).backend_layout
    replicated = jax.sharding.NamedSharding(images.mesh, jax.sharding.PartitionSpec())
    return replicated, images, labels


def describe(batches: DeviceBatches, spe: int) -> str:
    """One log line: where the training set is and how fit runs it."""
    megabytes = batches.x.nbytes / 2**20
    where = (
        "training set on the device (jax): one compiled gather per epoch"
        if batches.backend == "jax"
        else "training set in tf.data (tensorflow: host memory, batches gathered in C++, no Python per step)"
    )
    return (
        f"{where}: {len(batches.x)} uint8 images ({megabytes:.0f} MiB), {batches.steps_per_epoch} "
        f"batches/epoch, steps_per_execution={spe} ({math.ceil(batches.steps_per_epoch / spe)} calls/epoch)"
    )
