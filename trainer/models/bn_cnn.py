"""The default architecture: the augmented batch-norm CNN.

Three stages of two conv-BN-ReLU blocks (width, 2*width, 4*width channels), each stage ending
in 2x2 max-pooling and dropout, then global average pooling, dropout and the softmax head.
"""

from __future__ import annotations

import keras
from keras import layers

from trainer.models.common import conv_bn_relu, softmax_head

STAGES = 3


def body(
    x: keras.KerasTensor, *, width: int, dropout: float, bn_momentum: float, init: str
) -> keras.KerasTensor:
    for stage in range(STAGES):
        filters = width * 2**stage
        last = stage == STAGES - 1
        x = conv_bn_relu(x, filters, bn_momentum=bn_momentum, init=init, name=f"s{stage}a")
        # The last conv block's activation is named "last_conv": Grad-CAM reads it.
        x = conv_bn_relu(
            x, filters, bn_momentum=bn_momentum, init=init, name=f"s{stage}b",
            act_name="last_conv" if last else None,
        )
        if not last:
            x = layers.MaxPooling2D(2, name=f"s{stage}_pool")(x)
            x = layers.Dropout(dropout, name=f"s{stage}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    return layers.Dropout(dropout, name="head_dropout")(x)


def head(x: keras.KerasTensor, num_classes: int, *, bias: bool, init: str) -> keras.KerasTensor:
    return softmax_head(x, num_classes, bias=bias, init=init)
