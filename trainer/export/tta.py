"""Test-time augmentation an export can build into its signatures (`python -m trainer export --tta`).

`flip` answers with the mean of the model's probabilities on the image and on its horizontal mirror,
what trainer/evaluate.py reports as `test_accuracy_flip_tta`. It is off by default because it runs
the model twice per image. Written with plain slicing and arithmetic, so the same code mirrors a
tf.Tensor inside the exported graph and a numpy batch in verify_export's reference, and
trainer/export/arguments.py can list the choices without importing TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

NONE = "none"
FLIP = "flip"
CHOICES = (NONE, FLIP)
# Forward passes of the model per image the exported signatures run.
MODEL_EVALUATIONS = {NONE: 1, FLIP: 2}

Batch = TypeVar("Batch")


def check(tta: str) -> str:
    """`tta` when it is one of CHOICES; ValueError otherwise."""
    if tta not in CHOICES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(CHOICES)}")
    return tta


def mirror(images: Batch) -> Batch:
    """The horizontal mirror of an [N, H, W, C] batch (width is axis 2), tf.Tensor or numpy array."""
    return images[:, :, ::-1, :]  # type: ignore[index]


def averaged_probabilities(
    probabilities: Batch, predict: Callable[[Batch], Batch], images: Batch, tta: str
) -> Batch:
    """`probabilities` (the model's on `images`) as `tta` asks: unchanged for none; for flip, their
    mean with `predict(mirror(images))`."""
    if check(tta) == NONE:
        return probabilities
    return (probabilities + predict(mirror(images))) / 2.0  # type: ignore[operator]
