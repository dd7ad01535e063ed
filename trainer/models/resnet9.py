"""A fast residual net in the style of Page's ResNet-9 / airbench (accuracy per second on a GPU).

prep conv(w) -> [conv(2w) + pool + residual(2w)] -> [conv(4w) + pool] -> [conv(8w) + pool +
residual(8w)] -> global max pool -> dense (no bias) -> x0.125 -> softmax. Page uses w=64 and
PyTorch's default initialization (the registry's defaults: init "torch", head_bias False).
"""

from __future__ import annotations

import keras
from keras import layers

from trainer.models.common import conv_bn_relu, softmax_head


def _residual(x: keras.KerasTensor, filters: int, *, bn_momentum: float, init: str, name: str,
              last: bool = False) -> keras.KerasTensor:
    y = conv_bn_relu(x, filters, bn_momentum=bn_momentum, init=init, name=f"{name}_a")
    y = conv_bn_relu(y, filters, bn_momentum=bn_momentum, init=init, name=f"{name}_b")
    return layers.Add(name="last_conv" if last else f"{name}_add")([x, y])


def body(
    x: keras.KerasTensor, *, width: int, dropout: float, bn_momentum: float, init: str
) -> keras.KerasTensor:
    x = conv_bn_relu(x, width, bn_momentum=bn_momentum, init=init, name="prep")
    x = conv_bn_relu(x, 2 * width, bn_momentum=bn_momentum, init=init, name="layer1")
    x = layers.MaxPooling2D(2, name="layer1_pool")(x)
    x = _residual(x, 2 * width, bn_momentum=bn_momentum, init=init, name="res1")
    x = conv_bn_relu(x, 4 * width, bn_momentum=bn_momentum, init=init, name="layer2")
    x = layers.MaxPooling2D(2, name="layer2_pool")(x)
    x = conv_bn_relu(x, 8 * width, bn_momentum=bn_momentum, init=init, name="layer3")
    x = layers.MaxPooling2D(2, name="layer3_pool")(x)
    # The last residual's output is named "last_conv": Grad-CAM reads it.
    x = _residual(x, 8 * width, bn_momentum=bn_momentum, init=init, name="res3", last=True)
    x = layers.GlobalMaxPooling2D(name="global_pool")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    return x


def head(x: keras.KerasTensor, num_classes: int, *, bias: bool, init: str) -> keras.KerasTensor:
    return softmax_head(x, num_classes, scale=0.125, bias=bias, init=init)
