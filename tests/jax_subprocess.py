"""Run a Python snippet under KERAS_BACKEND=jax with TensorFlow unimportable, as on the GPU machines.

GPU machines here have JAX but no TensorFlow, so the trainer must stay backend-agnostic Keras. The
first finder on sys.meta_path refuses TensorFlow as if it were not installed, so any TensorFlow use
left in the trainer (or in Keras' JAX path) fails in the snippet. (Not sys.modules["tensorflow"] =
None: Keras reads a name in sys.modules as "TensorFlow is loaded".)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

HIDE_TENSORFLOW = """
import importlib.abc
import sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorboard", "tf_keras"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: GPU machines lack it)", name=name)
        return None

sys.meta_path.insert(0, NoTensorFlow())
"""


# XLA's CPU compiler at its lowest optimisation level. JAX compiles each eager op of model building
# and each train/eval step afresh per process, and these runs take a few steps each, so LLVM's code
# generation is most of their time: unoptimised, the profiles' XLA check takes 24 s instead of 67 s
# and a tiny data-parallel run ~13 s of CPU instead of ~45 s. Only the machine code's optimisation
# changes: which ops compile (and so model.jit_compile), the batch split, the gradients and the BN
# statistics do not depend on it. A caller's XLA_FLAGS replaces it.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_under_jax(
    snippet: str, *args: str, timeout: float = 600, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`snippet` (after the TensorFlow guard) in a fresh interpreter at the project root, JAX on the
    CPU unless JAX_PLATFORMS says otherwise; fails the test with the output when it exits non-zero."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", FAST_XLA),
        **(extra_env or {}),
    }
    result = subprocess.run(
        [sys.executable, "-c", HIDE_TENSORFLOW + snippet, *args],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
