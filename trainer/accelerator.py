"""What the hardware allows: GPUs, mixed precision, XLA and the multi-GPU distribution scope.

Kept apart from trainer/train.py so the training loop stays backend-agnostic Keras; the only
backend-specific code (TensorFlow's MirroredStrategy, device listing) lives here, guarded by
keras.backend.backend().
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
from dataclasses import dataclass
from typing import Any

import keras


@dataclass(frozen=True)
class Accelerator:
    gpus: int
    mixed_precision: bool
    jit_compile: bool
    scope: Any  # a context manager: the distribution strategy's scope, or a no-op

    def environment(self) -> dict[str, Any]:
        """What trained the model (RUN_DIR/environment.json, quoted by the model card): numbers from
        a GPU run under JAX and a CPU run under TensorFlow are not comparable without it."""
        backend = keras.backend.backend()
        try:
            backend_version = importlib.metadata.version(backend)
        except importlib.metadata.PackageNotFoundError:
            backend_version = None
        return {
            "keras_backend": backend,
            "backend_version": backend_version,
            "keras_version": keras.__version__,
            "python": platform.python_version(),
            "device": f"{self.gpus} GPU(s)" if self.gpus else "CPU",
            "gpus": self.gpus,
            "mixed_precision": self.mixed_precision,
            "jit_compile": self.jit_compile,
        }

    def describe(self) -> str:
        where = f"{self.gpus} GPU(s)" if self.gpus else "CPU"
        return (
            f"backend={keras.backend.backend()} device={where} mixed_precision={self.mixed_precision} "
            f"jit_compile={self.jit_compile}"
        )


def count_gpus() -> int:
    # Each backend package is imported only when it is Keras' backend: the others are optional and
    # may be missing (GPU machines run JAX without TensorFlow).
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return sum(1 for d in jax.devices() if d.platform == "gpu")
    if backend == "torch":
        import torch

        return torch.cuda.device_count()
    return 0


def _choose(setting: str, gpus: int) -> bool:
    return setting == "on" or (setting == "auto" and gpus > 0)


def setup(mixed_precision: str = "auto", jit_compile: str = "auto") -> Accelerator:
    """Set the global dtype policy and pick the distribution scope. Call before building models."""
    gpus = count_gpus()
    use_mp = _choose(mixed_precision, gpus)
    # float16 compute with float32 variables; Keras wraps the optimizer in a LossScaleOptimizer.
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mp else "float32")
    scope: Any = contextlib.nullcontext()
    if gpus > 1 and keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # only under the TensorFlow backend (see count_gpus)

        # All visible GPUs, batch split between them; variables are created inside this scope.
        scope = tf.distribute.MirroredStrategy().scope()
    return Accelerator(gpus=gpus, mixed_precision=use_mp, jit_compile=_choose(jit_compile, gpus), scope=scope)
