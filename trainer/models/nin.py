"""Network in Network (Lin, Chen & Yan 2013) for CIFAR-10, with batch norm and He initialization.

Three "mlpconv" blocks, each a spatial conv then two 1x1 convs (every conv -> BN -> ReLU):
  conv5(w) 1x1(5w/6) 1x1(w/2) -> 3x3/2 max pool -> dropout      (w=192: 192/160/96, as the paper)
  conv5(w) 1x1(w)    1x1(w)   -> 3x3/2 avg pool -> dropout
  conv3(w) 1x1(w)    [1x1(classes)] -> global average pool -> softmax
The paper's last 1x1 conv to one map per class, then global average pooling, is written here as
global average pooling, then the Dense `logits` head: both steps are linear, so they commute (the
paper's ReLU on the class maps is dropped) and the head stays the one every model shares.
"""

from __future__ import annotations

import keras
from keras import layers

from trainer.models.common import conv_bn_relu, softmax_head


def body(
    x: keras.KerasTensor, *, width: int, dropout: float, bn_momentum: float, init: str
) -> keras.KerasTensor:
    def block(x: keras.KerasTensor, name: str, kernel: int, filters: tuple[int, ...],
              last_name: str | None = None) -> keras.KerasTensor:
        # One spatial conv, then 1x1 convs; the block's last activation may carry a name.
        for i, f in enumerate(filters):
            last = i == len(filters) - 1
            x = conv_bn_relu(x, f, bn_momentum=bn_momentum, init=init, kernel_size=kernel if i == 0 else 1,
                             name=f"{name}{'abc'[i]}", act_name=last_name if last else None)
        return x

    x = block(x, "b1", 5, (width, max(1, round(width * 5 / 6)), max(1, width // 2)))
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="b1_pool")(x)
    x = layers.Dropout(dropout, name="b1_dropout")(x)
    x = block(x, "b2", 5, (width, width, width))
    x = layers.AveragePooling2D(3, strides=2, padding="same", name="b2_pool")(x)
    x = layers.Dropout(dropout, name="b2_dropout")(x)
    # The last 1x1 conv block's activation is named "last_conv": Grad-CAM reads it.
    # Block 3's second 1x1 conv (to one map per class) is the Dense head after the pooling.
    x = block(x, "b3", 3, (width, width), last_name="last_conv")
    return layers.GlobalAveragePooling2D(name="global_pool")(x)


def head(x: keras.KerasTensor, num_classes: int, *, bias: bool, init: str) -> keras.KerasTensor:
    return softmax_head(x, num_classes, bias=bias, init=init)
