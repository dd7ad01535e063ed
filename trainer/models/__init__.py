"""Model registry: architectures chosen by name, all with the same input/output contract.

`build_model(arch, ...)` returns a keras.Model taking float32 [N, 32, 32, 3] raw RGB 0..255,
normalizing with the training-split mean/std as its first layer, augmenting only in training,
and returning float32 softmax probabilities [N, num_classes]. The last convolutional feature
map is the layer named LAST_CONV_LAYER (for Grad-CAM). Importing this package registers the
custom layers, so `keras.saving.load_model` can read saved models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import keras

from trainer.models import bn_cnn, plain_cnn, resnet9
from trainer.models.augment import Cutout
from trainer.models.common import stem

LAST_CONV_LAYER = "last_conv"
DEFAULT_ARCH = "bn_cnn"

# name -> (body, head, default width)
_Body = Callable[..., keras.KerasTensor]
_Head = Callable[[keras.KerasTensor, int], keras.KerasTensor]
REGISTRY: dict[str, tuple[_Body, _Head, int]] = {
    "bn_cnn": (bn_cnn.body, bn_cnn.head, 64),
    "resnet9": (resnet9.body, resnet9.head, 64),
    "plain_cnn": (plain_cnn.body, plain_cnn.head, 32),
}

__all__ = ["LAST_CONV_LAYER", "REGISTRY", "Cutout", "available_architectures", "build_model"]


def available_architectures() -> list[str]:
    return sorted(REGISTRY)


def build_model(
    arch: str = DEFAULT_ARCH,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    augmentation: Any = None,
    width: int | None = None,
    dropout: float = 0.0,
    bn_momentum: float = 0.9,
    seed: int | None = None,
) -> keras.Model:
    """Build architecture `arch` (see REGISTRY).

    augmentation: an AugmentConfig, a dict of `augmentation_layers` arguments, or None (no
    augmentation). width: channels of the first block (None = the architecture's default).
    bn_momentum: Keras convention (PyTorch's momentum is 1 minus this). seed: augmentation seed
    (None = drawn from the global seed that keras.utils.set_random_seed fixes).
    """
    if arch not in REGISTRY:
        choices = ", ".join(available_architectures())
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {choices}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    body, head, default_width = REGISTRY[arch]
    if dataclasses.is_dataclass(augmentation) and not isinstance(augmentation, type):
        augmentation = dataclasses.asdict(augmentation)
    inputs, x = stem(mean, std, augmentation, seed)
    x = body(x, width=width or default_width, dropout=dropout, bn_momentum=bn_momentum)
    outputs = head(x, num_classes)
    return keras.Model(inputs, outputs, name=arch)
