"""Pieces every architecture shares: the normalize/augment stem, weight-init schemes, conv and
dense builders, and the softmax head."""

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


# Weight initialization schemes, selectable per model (build_model's `init`):
#   he_normal: He-normal conv and hidden Dense kernels, Glorot-uniform head (Keras' default), zero biases.
#   torch: PyTorch's default for Conv2d and Linear, as Page's ResNet-9 trains with: kaiming_uniform
#          (a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernels and biases alike.
INITS = ("he_normal", "torch")


def check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")


def kernel_initializer(init: str, *, head: bool = False) -> Any:
    """A fresh instance per layer: one unseeded instance reused would repeat its values (Keras warns)."""
    check_init(init)
    if init == "torch":
        # VarianceScaling uniform draws from +-sqrt(3 * scale / fan_in): scale 1/3 gives +-1/sqrt(fan_in).
        return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")
    return keras.initializers.GlorotUniform() if head else keras.initializers.HeNormal()


def bias_initializer(init: str, fan_in: int) -> Any:
    check_init(init)
    if init == "torch":
        bound = 1.0 / float(np.sqrt(fan_in))
        return keras.initializers.RandomUniform(-bound, bound)
    return keras.initializers.Zeros()


def conv(
    x: keras.KerasTensor,
    filters: int,
    kernel_size: int = 3,
    *,
    init: str,
    name: str,
    use_bias: bool = True,
    activation: str | None = None,
) -> keras.KerasTensor:
    """'same'-padded stride-1 conv with the `init` scheme's kernel (and bias) initializers."""
    fan_in = kernel_size * kernel_size * int(x.shape[-1])
    return layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        activation=activation,
        use_bias=use_bias,
        kernel_initializer=kernel_initializer(init),
        bias_initializer=bias_initializer(init, fan_in),
        name=name,
    )(x)


def dense(
    x: keras.KerasTensor, units: int, *, init: str, name: str, activation: str | None = None,
    use_bias: bool = True, head: bool = False,
) -> keras.KerasTensor:
    return layers.Dense(
        units,
        activation=activation,
        use_bias=use_bias,
        kernel_initializer=kernel_initializer(init, head=head),
        bias_initializer=bias_initializer(init, int(x.shape[-1])),
        name=name,
    )(x)


def conv_bn_relu(
    x: keras.KerasTensor,
    filters: int,
    *,
    bn_momentum: float,
    name: str,
    act_name: str | None = None,
    init: str = "he_normal",
    kernel_size: int = 3,
) -> keras.KerasTensor:
    """conv (no bias: BN's offset replaces it) -> batch norm -> ReLU."""
    x = conv(x, filters, kernel_size, init=init, use_bias=False, name=f"{name}_conv")
    x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=act_name or f"{name}_relu")(x)


def softmax_head(
    x: keras.KerasTensor, num_classes: int, *, scale: float = 1.0, bias: bool = True, init: str = "he_normal"
) -> keras.KerasTensor:
    """Dense logits -> softmax computed in float32, so mixed precision never rounds probabilities.

    bias=False is Page's ResNet-9 head (Linear(512, 10, bias=False)).
    """
    x = dense(x, num_classes, init=init, use_bias=bias, head=True, name="logits")
    if scale != 1.0:
        # ResNet-9 scales logits down (Page: x 0.125) so the softmax starts near uniform.
        x = layers.Rescaling(scale, name="logit_scale")(x)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(x)
