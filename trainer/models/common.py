"""Pieces every architecture shares: the input/normalize/augment stem and the softmax head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import layers

from trainer.models.augment import augmentation_layers

IMAGE_SHAPE = (32, 32, 3)


def stem(
    mean: Sequence[float],
    std: Sequence[float],
    augmentation: dict[str, Any] | None,
    seed: int | None,
) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Input (float32 raw 0..255) -> fixed normalization -> augmentation. Returns (input, x).

    Normalization comes first so the model carries its own constants: callers send raw pixels.
    """
    mean_a = np.asarray(mean, dtype="float32")
    std_a = np.asarray(std, dtype="float32")
    if mean_a.shape != (3,) or std_a.shape != (3,):
        raise ValueError(
            f"mean and std must have 3 values (R, G, B), got {mean_a.tolist()} and {std_a.tolist()}"
        )
    if np.any(std_a <= 0):
        raise ValueError(
            f"std must be > 0 per channel, got {std_a.tolist()}; is the training split constant?"
        )
    inputs = keras.Input(shape=IMAGE_SHAPE, dtype="float32", name="images")
    # float32 even under mixed precision: raw pixels up to 255 and their statistics need it.
    x = layers.Normalization(mean=mean_a, variance=np.square(std_a), dtype="float32", name="normalize")(
        inputs
    )
    low = float(np.min((0.0 - mean_a) / std_a))
    high = float(np.max((255.0 - mean_a) / std_a))
    aug_args = augmentation or {"enabled": False}
    for layer in augmentation_layers(**aug_args, value_range=(low, high), seed=seed):
        x = layer(x)
    return inputs, x


def conv_bn_relu(
    x: keras.KerasTensor, filters: int, *, bn_momentum: float, name: str, act_name: str | None = None
) -> keras.KerasTensor:
    """3x3 conv (He init, no bias: BN's offset replaces it) -> batch norm -> ReLU."""
    x = layers.Conv2D(
        filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=act_name or f"{name}_relu")(x)


def softmax_head(x: keras.KerasTensor, num_classes: int, *, scale: float = 1.0) -> keras.KerasTensor:
    """Dense logits -> softmax computed in float32, so mixed precision never rounds probabilities."""
    x = layers.Dense(num_classes, name="logits")(x)
    if scale != 1.0:
        # ResNet-9 scales logits down (Page: x 0.125) so the softmax starts near uniform.
        x = layers.Rescaling(scale, name="logit_scale")(x)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(x)
