"""What the hardware allows: GPUs, mixed precision and XLA.

Kept apart from trainer/train.py so the training loop stays backend-agnostic Keras; the
backend-specific device listing lives here, guarded by keras.backend.backend(). How the devices
share the work (MirroredStrategy, DataParallel, several processes) is trainer/distribute.py's.
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
    # A no-op context manager, kept for callers: the distribution's scope is trainer/distribute.py's.
    scope: Any
    # Keras' global dtype policy: float32, mixed_float16, or mixed_bfloat16 where the device has
    # bfloat16 arithmetic (see bfloat16_supported).
    dtype_policy: str = "float32"

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
            "dtype_policy": self.dtype_policy,
            "jit_compile": self.jit_compile,
        }

    def describe(self) -> str:
        where = f"{self.gpus} GPU(s)" if self.gpus else "CPU"
        return (
            f"backend={keras.backend.backend()} device={where} mixed_precision={self.mixed_precision} "
            f"({self.dtype_policy}) "
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


def bfloat16_supported() -> bool:
    """Whether every accelerator here computes in bfloat16 natively: NVIDIA GPUs of compute capability
    8.0 or newer (A100, H100; tensor cores take bfloat16) and TPUs. False on CPU and older GPUs, where
    bfloat16 would be emulated (slower than float32). Not measured on a GPU here."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices = [d for d in jax.devices() if d.platform != "cpu"]
        if devices and all(d.platform == "tpu" for d in devices):
            return True
        capabilities = [getattr(d, "compute_capability", None) for d in devices if d.platform == "gpu"]
        return bool(capabilities) and all(c is not None and float(c) >= 8.0 for c in capabilities)
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        details = [tf.config.experimental.get_device_details(g).get("compute_capability") for g in gpus]
        return bool(details) and all(c is not None and tuple(c) >= (8, 0) for c in details)
    return False


def _choose(setting: str, gpus: int) -> bool:
    return setting == "on" or (setting == "auto" and gpus > 0)


def setup(mixed_precision: str = "auto", jit_compile: str = "auto") -> Accelerator:
    """Set the global dtype policy. Call before building models (after distribute.setup)."""
    gpus = count_gpus()
    use_mp = _choose(mixed_precision, gpus)
    # Mixed precision: 16-bit compute, float32 variables. bfloat16 where the device has it: float32's
    # exponent range, so no loss scaling; else float16, for which Keras wraps the optimizer in a
    # LossScaleOptimizer. On CPU (auto) it stays float32.
    policy = "float32"
    if use_mp:
        policy = "mixed_bfloat16" if bfloat16_supported() else "mixed_float16"
    keras.mixed_precision.set_global_policy(policy)
    return Accelerator(gpus=gpus, mixed_precision=use_mp, jit_compile=_choose(jit_compile, gpus),
                       scope=contextlib.nullcontext(), dtype_policy=policy)
